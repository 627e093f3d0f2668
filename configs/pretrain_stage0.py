"""Pre-training stage 0: the encoders (and projections) trained with the global soft-label
losses only (itgc, imvc, utgc); fusion is not run. Towers as in configs/base.py:
  --config=configs/pretrain_stage0.py:image=clip_vit_b16,text=bio_clinicalbert"""

from configs import base
from configs.pretrain_common import pretraining


def get_config(arg=None):
  config = base.get_config(arg)
  config.model.head = "none"
  pretraining(config)
  config.losses.weights.update(wpa=0.0, itm=0.0)
  # Fusion (and the modality-type embedding added before it) is not run; frozen, so that
  # weight decay leaves it as initialised.
  config.optim.lr_mults = ((r"fusion/.*", 0.0), (r"itm_head/.*", 0.0), (r"type_embed/.*", 0.0))
  return config
