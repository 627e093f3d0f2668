"""Parity of the open_clip (BiomedCLIP architecture) import with open_clip's forward."""

import numpy as np
import torch

from helpers import max_diff, padded_ids
from medvqa_jax.models import towers

TOL = 1e-4


def test_timm_image_tower_matches_open_clip(biomedclip):
  ref, folder = biomedclip
  module, params = towers.load("image", "open_clip", folder)
  assert not module.pre_norm and module.act == "gelu" and module.ln_eps == 1e-6
  assert module.patch_bias and module.num_heads == 3
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    tokens = ref.visual.trunk.forward_features(xt)
    emb = ref.encode_image(xt)
  assert max_diff(out["tokens"], tokens) <= TOL
  assert max_diff(out["pooled"], tokens[:, 0]) <= TOL
  assert max_diff(out["embedding"], emb) <= TOL


def test_bert_text_tower_matches_open_clip(biomedclip):
  """open_clip masks the pad id (0) and pools the CLS token; the projection is an MLP."""
  ref, folder = biomedclip
  module, params = towers.load("text", "open_clip", folder)
  assert module.pooler == "cls" and module.proj_kind == "mlp"
  rng = np.random.default_rng(1)
  ids, mask = padded_ids(rng, [40, 17, 5], 40, 120, first=2, last=3)
  out = module.apply({"params": params}, ids, mask)
  with torch.no_grad():
    t_ids = torch.from_numpy(ids)
    hidden = ref.text.transformer(input_ids=t_ids, attention_mask=torch.from_numpy(mask))
    emb = ref.encode_text(t_ids)
  assert max_diff(out["tokens"], hidden.last_hidden_state) <= TOL
  assert max_diff(out["embedding"], emb) <= TOL


def test_teacher_at_another_resolution(biomedclip):
  """Position embeddings are resized like timm's bicubic resample when the trunk runs at
  another size (timm's own resample_abs_pos_embed as the reference)."""
  from timm.layers import resample_abs_pos_embed
  ref, folder = biomedclip
  module, params = towers.load("image", "open_clip", folder, image_size=256)
  with torch.no_grad():
    expected = resample_abs_pos_embed(ref.visual.trunk.pos_embed, (16, 16), (14, 14),
                                      num_prefix_tokens=1, interpolation="bicubic",
                                      antialias=False)
  assert max_diff(params["pos_embed"], expected[0]) <= 1e-5
