"""Pre-training stage 1: both encoders frozen (an optimizer mask); fusion, projections and
temperatures trained with the global losses + OT word-patch alignment (weight 3) + ITM with
hard negatives. It starts from stage 0's run (its best-on-validation step):

  python launch/train.py --config=configs/pretrain_stage1.py --config.data.dir=/data/tfds \
      --config.teacher.cache=/data/teacher_roco.npz --config.train.init_from=/runs/stage0 \
      --config.train.workdir=/runs/stage1

and fine-tuning from stage 1's, with --config.train.init_from=/runs/stage1."""

from configs import base
from configs.pretrain_common import pretraining


def get_config(arg=None):
  config = base.get_config(arg)
  config.model.head = "none"
  pretraining(config)
  config.optim.lr_mults = ((r"image/.*", 0.0), (r"text/.*", 0.0))
  return config
