"""Pre-training stage 1: both encoders frozen (an optimizer mask); fusion, projections and
temperatures trained with the global losses + OT word-patch alignment (weight 3) + ITM with
hard negatives."""

from configs import base
from configs.pretrain_common import pretraining


def get_config(arg=None):
  config = base.get_config(arg)
  config.model.head = "none"
  pretraining(config)
  config.optim.lr_mults = ((r"image/.*", 0.0), (r"text/.*", 0.0))
  return config
