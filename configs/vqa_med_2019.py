"""Fine-tuning on ImageCLEF VQA-Med 2019.

  python launch/train.py --config=configs/vqa_med_2019.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/vqa_med_2019 [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  return finetune.get_config(arg, dataset="vqa_med_2019", epochs=20, val_split="validation")
