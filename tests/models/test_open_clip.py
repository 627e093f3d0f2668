"""Parity of the open_clip (BiomedCLIP architecture) import with open_clip's forward."""

import json

import numpy as np
import pytest
import torch

from helpers import max_diff, padded_ids
from medvqa_jax.models import importers, towers
from medvqa_jax.models.state_dict import CheckpointError

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


@pytest.mark.parametrize("image_size", [256, 160])
def test_teacher_at_another_resolution(biomedclip, image_size):
  """Position embeddings are resized as timm resizes them when the trunk runs at another size
  (timm's own resample_abs_pos_embed, with its defaults, as the reference: antialiased
  bicubic; the resize without antialias was up to 0.35 off growing 14 -> 16)."""
  from timm.layers import resample_abs_pos_embed
  ref, folder = biomedclip
  grid = image_size // 16
  _, params = towers.load("image", "open_clip", folder, image_size=image_size)
  with torch.no_grad():
    expected = resample_abs_pos_embed(ref.visual.trunk.pos_embed, (grid, grid), (14, 14),
                                      num_prefix_tokens=1)
  assert params["pos_embed"].shape == (1 + grid * grid, expected.shape[-1])
  assert max_diff(params["pos_embed"], expected[0]) <= 1e-5


def _variant(folder, tmp_path, edit_config=None, edit_state=None, name="variant"):
  """A copy of an open_clip checkpoint folder with its config and/or state dict edited."""
  out = tmp_path / name
  out.mkdir()
  cfg = json.loads((folder / "open_clip_config.json").read_text())
  if edit_config:
    edit_config(cfg["model_cfg"])
  (out / "open_clip_config.json").write_text(json.dumps(cfg))
  state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
  if edit_state:
    edit_state(state)
  torch.save(state, out / "open_clip_pytorch_model.bin")
  return out


def test_open_clip_defaults_are_read_as_open_clip_reads_them(biomedclip, tmp_path):
  """A config that leaves out timm_pool or hf_pooler_type means open_clip's defaults (mean
  pooling of the patches, of the text tokens), which these towers do not compute: refused,
  not read as CLS pooling. So is a text tower that is not a Hugging Face one."""
  _, folder = biomedclip
  no_pool = _variant(folder, tmp_path, lambda c: c["vision_cfg"].pop("timm_pool"), name="a")
  with pytest.raises(ValueError, match="open_clip's defaults: 'avg'"):
    towers.load("image", "open_clip", no_pool)
  no_pooler = _variant(folder, tmp_path, lambda c: c["text_cfg"].pop("hf_pooler_type"),
                       name="b")
  with pytest.raises(ValueError, match="open_clip's default: 'mean_pooler'"):
    towers.load("text", "open_clip", no_pooler)
  native = _variant(folder, tmp_path, lambda c: c["text_cfg"].pop("hf_model_name"), name="c")
  with pytest.raises(ValueError, match="only Hugging Face text towers"):
    towers.load("text", "open_clip", native)
  # Without hf_proj_type, open_clip's default projection (an MLP), as open_clip encodes.
  ref, _ = biomedclip
  no_proj = _variant(folder, tmp_path, lambda c: c["text_cfg"].pop("hf_proj_type"), name="d")
  module, params = towers.load("text", "open_clip", no_proj)
  assert module.proj_kind == "mlp"
  ids, mask = padded_ids(np.random.default_rng(1), [40], 40, 120, first=2, last=3)
  with torch.no_grad():
    emb = ref.encode_text(torch.from_numpy(ids))
  assert max_diff(module.apply({"params": params}, ids, mask)["embedding"], emb) <= TOL


def test_an_image_size_given_as_height_and_width(biomedclip, tmp_path):
  """open_clip takes vision_cfg.image_size as [height, width] too (a TypeError here before):
  square is read as its side, anything else refused by name."""
  _, folder = biomedclip
  _, params = towers.load("image", "open_clip", folder)
  square = _variant(folder, tmp_path, lambda c: c["vision_cfg"].update(image_size=[224, 224]),
                    name="square")
  module, same = towers.load("image", "open_clip", square)
  assert module.image_size == 224
  assert max_diff(same["pos_embed"], params["pos_embed"]) == 0
  oblong = _variant(folder, tmp_path, lambda c: c["vision_cfg"].update(image_size=[224, 192]),
                    name="oblong")
  with pytest.raises(ValueError, match=r"vision_cfg.image_size \[224, 192\]: only square"):
    towers.load("image", "open_clip", oblong)


def test_a_text_tower_named_on_the_hub_needs_its_head_count(biomedclip, tmp_path):
  """With hf_model_name a hub name (no config.json to read), the shapes come from the
  weights, but the head count changes none of them: the tiny tower's 4 heads of 16 were read
  as 64 // 64 = 1 head and loaded cleanly, wrong. Now it must be given, and then matches."""
  ref, folder = biomedclip
  hub = _variant(folder, tmp_path, lambda c: c["text_cfg"].update(hf_model_name="org/tiny-bert"))
  with pytest.raises(ValueError, match="org/tiny-bert.*at width 64 it cannot be assumed"):
    towers.load("text", "open_clip", hub)
  module, params = towers.load("text", "open_clip", hub, num_heads=4)
  # MiniLM's width, 384 (12 heads of 32, not 6 of 64), is not assumed either.
  e = "text.transformer.embeddings."
  wide = {e + "word_embeddings.weight": np.zeros((120, 384), np.float32),
          e + "position_embeddings.weight": np.zeros((40, 384), np.float32),
          e + "token_type_embeddings.weight": np.zeros((2, 384), np.float32)}
  with pytest.raises(ValueError, match="at width 384 it cannot be assumed"):
    importers.open_clip_spec(hub, "text", wide, {})
  ids, mask = padded_ids(np.random.default_rng(2), [40, 9], 40, 120, first=2, last=3)
  out = module.apply({"params": params}, ids, mask)
  with torch.no_grad():
    emb = ref.encode_text(torch.from_numpy(ids))
  assert max_diff(out["embedding"][:1], emb[:1]) <= TOL  # The unpadded row (open_clip's mask).


def test_a_timm_trunk_with_heads_not_64_wide(tmp_path):
  """timm's ViT with 2 heads of 40 (width 80): refused without a head count (width // 64
  would be 1 head), equal to timm's forward with it."""
  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(5)
  trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=80, depth=2, num_heads=2,
                            mlp_ratio=2.0, num_classes=0).eval()
  proj = torch.randn(16, 80)
  state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
  state["visual.head.proj.weight"] = proj
  folder = tmp_path / "vit80"
  folder.mkdir()
  torch.save(state, folder / "open_clip_pytorch_model.bin")
  (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
      "embed_dim": 16, "vision_cfg": {"timm_model_name": "vit_custom", "timm_pool": "",
                                      "timm_proj": "linear", "image_size": 32}}}))
  with pytest.raises(ValueError, match="'vit_custom'.*at width 80 it cannot be assumed"):
    towers.load("image", "open_clip", folder)
  module, params = towers.load("image", "open_clip", folder, num_heads=2)
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    tokens = trunk.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert max_diff(out["tokens"], tokens) <= TOL
  assert max_diff(out["embedding"], tokens[:, 0] @ proj.T) <= TOL


def test_checkpoints_that_do_not_fit_name_the_key(biomedclip, tmp_path):
  _, folder = biomedclip
  no_cls = _variant(folder, tmp_path, edit_state=lambda s: s.pop("visual.trunk.cls_token"),
                    name="a")
  with pytest.raises(CheckpointError, match="missing key visual.trunk.cls_token"):
    towers.load("image", "open_clip", no_cls)
  # 197 grid tokens are no square grid: a shape mismatch naming the key and the parameter.
  key = "visual.trunk.pos_embed"
  odd = _variant(folder, tmp_path, name="b",
                 edit_state=lambda s: s.update({key: torch.zeros(1, 198, 192)}))
  with pytest.raises(CheckpointError, match=rf"(?s)shape mismatches.*{key}: .*not a square grid "
                                            r"\(for pos_embed"):
    towers.load("image", "open_clip", odd)
  qkv = "visual.trunk.blocks.1.attn.qkv.weight"
  bad_qkv = _variant(folder, tmp_path, name="c",
                     edit_state=lambda s: s.update({qkv: torch.zeros(3 * 192 + 3, 192)}))
  with pytest.raises(CheckpointError, match=rf"{qkv}.*for block_1/attn"):
    towers.load("image", "open_clip", bad_qkv)


def test_an_image_projection_with_a_bias_is_loaded(biomedclip, tmp_path):
  """timm_proj "linear" with a bias (visual.head.proj.bias): the bias is loaded and added to
  the image embedding, not refused as unexpected nor dropped."""
  bias = torch.randn(32, generator=torch.Generator().manual_seed(0))
  folder = _variant(biomedclip[1], tmp_path,
                    edit_state=lambda s: s.update({"visual.head.proj.bias": bias}))
  module, params = towers.load("image", "open_clip", folder, image_size=32)
  assert module.proj_bias
  np.testing.assert_array_equal(params["head"]["proj"]["bias"], bias.numpy())
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out = module.apply({"params": params}, x)
  want = out["pooled"] @ params["head"]["proj"]["kernel"] + bias.numpy()
  assert max_diff(out["embedding"], want) <= TOL


def test_open_clip_pixel_statistics_are_checked(biomedclip, tmp_path):
  """BiomedCLIP's preprocess_cfg (CLIP's mean and std) loads; other statistics are refused:
  the tower normalises with CLIP's."""
  _, folder = biomedclip
  for name, mean in (("same", [0.48145466, 0.4578275, 0.40821073]), ("other", [0.5] * 3)):
    out = _variant(folder, tmp_path, name=name)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"] = {"mean": mean, "std": [0.26862954, 0.26130258, 0.27577711]}
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
  towers.load("image", "open_clip", tmp_path / "same")
  with pytest.raises(ValueError, match=r"open_clip_config.json: the image tower was trained on "
                     r"pixels normalised with mean \[0.5, 0.5, 0.5\]"):
    towers.load("image", "open_clip", tmp_path / "other")
