"""BiomedCLIP (open_clip checkpoint: timm ViT-B/16 + PubMedBERT), the soft-label teacher.

The teacher sees un-augmented images resized to 224 px and the cleaned captions the student
reads; in pre-training at the student's caption length (configs/pretrain_common.py).
"""

import ml_collections

from configs.towers.common import tower, unset


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      image=tower("vit", "open_clip", dict(image_size=224, depth=unset(int))),
      text=tower("bert", "open_clip", dict(depth=unset(int)), max_len=256),
  ))
