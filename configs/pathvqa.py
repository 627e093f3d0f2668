"""Fine-tuning on PathVQA.

  python launch/train.py --config=configs/pathvqa.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/pathvqa [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  return finetune.get_config(arg, dataset="pathvqa", epochs=20, val_split="validation")
