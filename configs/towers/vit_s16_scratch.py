"""A ViT-S/16-wide image tower (224 px, width 384, 6 heads; 6 blocks, half ViT-S's depth)
trained from scratch: the image tower of the first real-data results, where no medical image
weights are available offline. Pair it with a real text checkpoint, e.g.
`:image=vit_s16_scratch,text=minilm`."""

import ml_collections

from configs.towers.common import tower


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      image=tower("vit", "init", dict(
          image_size=224, patch_size=16, width=384, depth=6, num_heads=6, mlp_dim=1536,
          pre_norm=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False)),
  ))
