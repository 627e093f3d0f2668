"""Fine-tuning defaults shared by the dataset configs: the reference code's hyper-parameters
(AdamW, lr 1.5e-5, weight decay 0.05, betas (0.9, 0.98), cosine schedule after a 40% linear
warm-up; batch 48, its 24 per GPU on 2 GPUs; questions of 30 tokens; its 288 px images are
the image tower's size, which its preset sets: clip_vit_b16's is 288, vit_s16_scratch's 224), bf16
compute with float32 parameters, and the generative answer head. No teacher is used.

Towers as in configs/base.py, e.g.
  python launch/train.py --config=configs/slake.py:image=clip_vit_b16,text=bio_clinicalbert \
      --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16 \
      --config.model.text.checkpoint=/ckpt/Bio_ClinicalBERT \
      --config.data.dir=/data/tfds --config.train.workdir=/runs/slake
"""

from configs import base
from configs.towers.common import bf16


def get_config(arg=None, *, dataset: str, epochs: int, val_split: str = "validation",
               prior_max_tokens: int | None = None):
  """prior_max_tokens: the GCA prior's cap for a dataset whose answers hold more distinct word
  pieces than base.py's 1,024 (the prior costs what the answers need, padded to 128)."""
  config = base.get_config(arg)
  if prior_max_tokens is not None:
    config.model.prior_max_tokens = prior_max_tokens
  config.model.text.max_len = 30
  bf16(config)
  config.teacher.mode = "none"
  config.optim.update(lr=1.5e-5, weight_decay=0.05)
  config.data.update(name=dataset, val_split=val_split)
  config.train.update(epochs=epochs, batch_size=48)
  return config
