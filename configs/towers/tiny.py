"""Tiny randomly initialised towers (CLIP-style ViT + BERT) for tests and CPU smoke runs;
the BERT reads the bundled BERT vocabulary (no files to point at)."""

import ml_collections

from configs.towers.common import tower
from medvqa_jax import ASSETS


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      image=tower("vit", "init", dict(
          image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
          pre_norm=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False, proj_dim=32)),
      text=tower("bert", "init", dict(
          vocab_size=30522, max_positions=64, type_vocab_size=2, width=64, depth=2,
          num_heads=4, mlp_dim=128, pooler="cls", proj_dim=32),
          tokenizer=str(ASSETS / "bert_uncased_vocab")),
  ))
