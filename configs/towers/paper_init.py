"""Paper-size towers with random weights (no checkpoint): the CLIP ViT-B/16 image tower at
288 px with 11 blocks, and a BERT-base text tower (Bio_ClinicalBERT's shape). For parameter
counts and benchmarks on synthetic data."""

import ml_collections

from configs.towers.common import tower


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      image=tower("vit", "init", dict(
          image_size=288, patch_size=16, width=768, depth=11, num_heads=12, mlp_dim=3072,
          pre_norm=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False, proj_dim=512)),
      text=tower("bert", "init", dict(
          vocab_size=28996, max_positions=512, type_vocab_size=2, width=768, depth=12,
          num_heads=12, mlp_dim=3072, pooler="cls")),
  ))
