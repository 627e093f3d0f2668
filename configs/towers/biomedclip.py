"""BiomedCLIP (open_clip checkpoint: timm ViT-B/16 + PubMedBERT), the soft-label teacher.

The teacher sees un-augmented images resized to 224 px and the cleaned captions the student
reads, at the student's caption length (configs/base.py).
"""

import ml_collections

from configs.towers.common import tower, unset


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      # num_heads: where the checkpoint does not state it, width // 64 (as in BiomedCLIP);
      # set it for a tower whose heads are not 64 wide.
      image=tower("vit", "open_clip", dict(image_size=224, depth=unset(int),
                                           num_heads=unset(int))),
      text=tower("bert", "open_clip", dict(depth=unset(int), num_heads=unset(int)),
                 max_len=256, positions=256),
  ))
