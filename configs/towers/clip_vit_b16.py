"""OpenAI CLIP ViT-B/16 as a Hugging Face CLIPModel folder (also fits PubMedCLIP).

The paper's image tower: 288 px (position embeddings resized from 224), 11 of 12 blocks.
"""

import ml_collections

from configs.towers.common import tower, unset


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      image=tower("vit", "hf_clip", dict(image_size=288, depth=11)),
      text=tower("clip_text", "hf_clip", dict(depth=unset(int)), positions=77),
  ))
