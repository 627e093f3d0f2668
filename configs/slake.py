"""Fine-tuning on SLAKE 1.0, English subset.

  python launch/train.py --config=configs/slake.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/slake [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  return finetune.get_config(arg, dataset="slake", epochs=30, val_split="validation")
