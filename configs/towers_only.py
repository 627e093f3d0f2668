"""Towers only: the like-for-like speed reference for `launch/benchmark.py`.

A CLIP ViT-B/16 image tower at 224 px and CLIP's 12-layer, 512-wide text tower (77 tokens),
randomly initialised, each pooled feature projected to 512; no fusion, no answer head; the
image<->text contrastive loss alone (hard-label InfoNCE without label smoothing, no teacher);
bf16 compute with float32 parameters; a global batch of 256. This is the step of a plain CLIP training run,
the one the PyTorch reference figures in BENCHMARKS.md time.

  python launch/benchmark.py --config=configs/towers_only.py
  python launch/benchmark.py --config=configs/towers_only.py:tiny --batch_size=8   # CPU

`:tiny` shrinks both towers (for a quick run on a CPU); the objective is the same.
"""

from configs import base
from configs.towers.common import bf16, tower


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/towers_only.py takes no argument or 'tiny', not {arg!r}")
  config = base.get_config("image=tiny,text=tiny,teacher=tiny")
  if arg == "tiny":
    image = dict(image_size=64, patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=512)
    text = dict(vocab_size=1000, context_length=32, width=128, depth=2, num_heads=4,
                mlp_dim=512)
    width, batch = 128, 8
  else:
    image = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                 mlp_dim=3072)
    text = dict(vocab_size=49408, context_length=77, width=512, depth=12, num_heads=8,
                mlp_dim=2048)
    width, batch = 512, 256
  config.model.image = tower("vit", "init", dict(
      image, pre_norm=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False))
  config.model.text = tower("clip_text", "init", dict(text, act="quick_gelu", ln_eps=1e-5),
                            max_len=text["context_length"])
  # No fusion: the pooled features are projected (fusion.width) and contrasted.
  config.model.fusion.update(width=width, layers=0)
  config.model.head = "none"
  config.teacher.mode = "none"
  config.losses.weights = dict(itgc=1.0, imvc=0.0, utgc=0.0, wpa=0.0, itm=0.0)
  config.losses.label_smoothing = 0.0  # CLIP's loss (base's 0.1 is the reference's).
  bf16(config)
  config.train.batch_size = batch
  return config
