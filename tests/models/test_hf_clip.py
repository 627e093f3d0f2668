"""Parity of the Hugging Face CLIPModel import with transformers' PyTorch forward."""

import numpy as np
import pytest
import torch

from helpers import max_diff, padded_ids
from conftest import CLIP_BOS, CLIP_EOS, CLIP_VOCAB
from medvqa_jax.models import towers
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.vit import VisionTransformer

TOL = 1e-4


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_images(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_vision_tower_matches_transformers(hf_clip):
  ref, folder = hf_clip
  module, params = towers.load("image", "hf_clip", folder)
  assert isinstance(module, VisionTransformer) and module.pre_norm and module.act == "quick_gelu"
  x = _images(3, 32)
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    r = ref.vision_model(pixel_values=_torch_images(x))
    post = ref.vision_model.post_layernorm(r.last_hidden_state)
    emb = ref.visual_projection(r.pooler_output)
  assert out["encoded"].shape == (3, 17, 64)
  assert max_diff(out["encoded"], r.last_hidden_state) <= TOL
  assert max_diff(out["tokens"], post) <= TOL
  assert max_diff(out["pooled"], r.pooler_output) <= TOL
  assert max_diff(out["embedding"], emb) <= TOL


def test_vision_tower_at_another_size_matches_interpolated_reference(hf_clip):
  """224 -> 288 in the paper; here 32 -> 48 px: transformers resizes the position grid with
  bicubic interpolation on the fly, we resize it once at load time."""
  ref, folder = hf_clip
  module, params = towers.load("image", "hf_clip", folder, image_size=48)
  assert params["pos_embed"].shape == (1 + 6 * 6, 64)
  x = _images(2, 48, seed=1)
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    r = ref.vision_model(pixel_values=_torch_images(x), interpolate_pos_encoding=True)
  assert max_diff(out["encoded"], r.last_hidden_state) <= TOL
  assert max_diff(out["pooled"], r.pooler_output) <= TOL


def test_vision_tower_keeps_first_blocks(hf_clip):
  """depth=2 of 3 (the paper keeps 11 of 12): the output is the reference's hidden state
  after two blocks."""
  ref, folder = hf_clip
  module, params = towers.load("image", "hf_clip", folder, depth=2)
  assert module.depth == 2 and "block_2" not in params
  x = _images(2, 32, seed=2)
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    r = ref.vision_model(pixel_values=_torch_images(x), output_hidden_states=True)
  assert max_diff(out["encoded"], r.hidden_states[2]) <= TOL
  assert max_diff(out["encoded"], r.last_hidden_state) > 1e-2  # The third block mattered.


def _text_matches(module, params, ref, ids, mask) -> dict:
  """Our text tower's outputs on ids, after checking its tokens (pads included) and pooled
  feature against transformers' CLIP text model's."""
  out = module.apply({"params": params}, ids, mask)
  with torch.no_grad():
    r = ref.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  assert max_diff(out["tokens"], r.last_hidden_state) <= TOL
  assert max_diff(out["pooled"], r.pooler_output) <= TOL
  return out


def test_text_tower_matches_transformers_with_padding(hf_clip):
  ref, folder = hf_clip
  module, params = towers.load("text", "hf_clip", folder)
  assert isinstance(module, ClipTextTransformer) and module.eos_token_id == CLIP_EOS
  rng = np.random.default_rng(0)
  ids, mask = padded_ids(rng, [16, 9, 4], 16, CLIP_VOCAB, first=CLIP_BOS, last=CLIP_EOS)
  out = module.apply({"params": params}, ids, mask)
  with torch.no_grad():
    r = ref.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    emb = ref.text_projection(r.pooler_output)
  assert max_diff(out["tokens"], r.last_hidden_state) <= TOL  # Every token, pads included.
  assert max_diff(out["pooled"], r.pooler_output) <= TOL
  assert max_diff(out["embedding"], emb) <= TOL
  # A shorter context (questions of at most 10 tokens): the first 10 positions of the
  # checkpoint's 16, as transformers reads them for inputs of that length.
  short, short_params = towers.load("text", "hf_clip", folder, context_length=10)
  assert short_params["pos_embed"].shape == (10, 48)
  ids, mask = padded_ids(rng, [10, 6], 10, CLIP_VOCAB, first=CLIP_BOS, last=CLIP_EOS)
  _text_matches(short, short_params, ref, ids, mask)
  # Sequences shorter than the context (questions padded to model.text.max_len, 30 against
  # 77 in the fine-tuning configs) read its first positions too.
  ids, mask = padded_ids(rng, [12, 7], 12, CLIP_VOCAB, first=CLIP_BOS, last=CLIP_EOS)
  _text_matches(module, params, ref, ids, mask)


def test_a_loaded_tower_computes_in_the_dtype_asked_for(hf_clip):
  """`dtype` is the compute dtype (the bf16 tower settings): the module computes in it, its
  parameters stay float32 as stored."""
  import jax
  import jax.numpy as jnp
  _, folder = hf_clip
  module, params = towers.load("image", "hf_clip", folder, dtype="bfloat16")
  assert module.dtype == jnp.bfloat16
  out = module.apply({"params": params}, _images(1, 32))
  assert out["encoded"].dtype == jnp.bfloat16
  assert {v.dtype for v in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_text_tower_is_causal(hf_clip):
  _, folder = hf_clip
  module, params = towers.load("text", "hf_clip", folder)
  rng = np.random.default_rng(1)
  ids, mask = padded_ids(rng, [12], 12, CLIP_VOCAB, first=CLIP_BOS, last=CLIP_EOS)
  changed = ids.copy()
  changed[0, 8] = (changed[0, 8] % 90) + 1
  a = module.apply({"params": params}, ids, mask)["tokens"]
  b = module.apply({"params": params}, changed, mask)["tokens"]
  assert max_diff(a[:, :8], b[:, :8]) == 0.0
  assert max_diff(a[:, 8:], b[:, 8:]) > 1e-3


def test_pytorch_bin_and_legacy_end_of_text(hf_clip_bin):
  """pytorch_model.bin is read through torch; a config with the legacy eos_token_id=2 pools
  at the largest id, as transformers does."""
  ref, folder = hf_clip_bin
  module, params = towers.load("text", "hf_clip", folder)
  assert module.eos_token_id is None
  rng = np.random.default_rng(2)
  ids, mask = padded_ids(rng, [10, 5], 16, CLIP_VOCAB, first=CLIP_BOS, last=CLIP_EOS)
  _text_matches(module, params, ref, ids, mask)
  image, image_params = towers.load("image", "hf_clip", folder)
  x = _images(1, 32, seed=3)
  with torch.no_grad():
    r = ref.vision_model(pixel_values=_torch_images(x))
  assert max_diff(image.apply({"params": image_params}, x)["pooled"], r.pooler_output) <= TOL


def test_depth_beyond_checkpoint_is_an_error(hf_clip):
  _, folder = hf_clip
  with pytest.raises(ValueError, match="depth=4 requested but .* has 3 blocks"):
    towers.load("image", "hf_clip", folder, depth=4)


def test_an_image_tower_trained_on_other_pixel_statistics_is_refused(hf_clip, tmp_path):
  """The towers normalise pixels with CLIP's mean and std. A checkpoint whose image processor
  says otherwise (ImageNet's statistics here) would give other features, silently: refused,
  naming the file. CLIP's own processor config loads; the text tower is not concerned."""
  import json
  from transformers import CLIPImageProcessor
  _, folder = hf_clip
  for name in ("same", "other"):
    out = tmp_path / name
    out.mkdir()
    for f in folder.iterdir():
      (out / f.name).symlink_to(f)
    CLIPImageProcessor().save_pretrained(out)  # CLIP's mean and std.
  towers.load("image", "hf_clip", tmp_path / "same")
  path = tmp_path / "other" / "preprocessor_config.json"
  cfg = json.loads(path.read_text())
  cfg.update(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
  path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"preprocessor_config.json: the image tower was trained "
                     r"on pixels normalised with mean \[0.485, 0.456, 0.406\]"):
    towers.load("image", "hf_clip", tmp_path / "other")
  towers.load("text", "hf_clip", tmp_path / "other")
  # A whole CLIPProcessor saved by transformers 5: processor_config.json, the image
  # processor's settings inside (no preprocessor_config.json: it loaded unchecked).
  from transformers import CLIPProcessor, CLIPTokenizer
  whole = tmp_path / "whole"
  whole.mkdir()
  for f in folder.iterdir():
    (whole / f.name).symlink_to(f)
  tokenizer = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2},
                            merges=[])  # A processor needs one; the image tower does not.
  CLIPProcessor(image_processor=CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3),
                tokenizer=tokenizer).save_pretrained(whole)
  assert (whole / "processor_config.json").exists()
  assert not (whole / "preprocessor_config.json").exists()
  with pytest.raises(ValueError, match=r"processor_config.json: the image tower was trained "
                     r"on pixels normalised with mean \[0.5, 0.5, 0.5\]"):
    towers.load("image", "hf_clip", whole)


def test_text_tower_pools_at_the_configs_end_of_text_not_the_largest_id(hf_clip, tmp_path):
  """A config whose eos_token_id is not the largest id in a row (ids above it follow the
  end-of-text here): the pooled feature is the first end-of-text token's, as transformers
  pools, not the largest id's (the legacy convention, for eos_token_id 2 only)."""
  import json
  import transformers
  _, folder = hf_clip
  for f in folder.iterdir():
    if f.name != "config.json":
      (tmp_path / f.name).symlink_to(f)
  cfg = json.loads((folder / "config.json").read_text())
  eos = 40
  cfg["text_config"]["eos_token_id"] = eos
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  module, params = towers.load("text", "hf_clip", tmp_path)
  assert module.eos_token_id == eos
  ref = transformers.CLIPModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
  rng = np.random.default_rng(4)
  ids, mask = padded_ids(rng, [16, 11, 6], 16, CLIP_VOCAB, first=CLIP_BOS)
  ids[ids == eos] = eos + 1
  ends = np.array([5, 7, 3])  # Larger ids (BOS's, 98) after each end-of-text.
  ids[np.arange(3), ends] = eos
  ids[np.arange(3), ends + 1] = CLIP_BOS
  out = _text_matches(module, params, ref, ids, mask)
  np.testing.assert_allclose(out["pooled"], out["tokens"][np.arange(3), ends], rtol=0, atol=0)
