"""Fine-tuning on VQA-RAD (the MEVF split). VQA-RAD has no validation split: models are
selected on a seeded 10% of the training images (data.val_split="").

  python launch/train.py --config=configs/vqa_rad.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/vqa_rad [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  return finetune.get_config(arg, dataset="vqa_rad", epochs=50, val_split="")
