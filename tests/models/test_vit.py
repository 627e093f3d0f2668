"""Position-embedding resizing and reduced-precision compute of the towers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import rel_err
from medvqa_jax.models import towers, vit
from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.vit import VisionTransformer


def _posemb(grid, width=8, seed=0):
  return np.random.default_rng(seed).normal(size=(1 + grid * grid, width)).astype(np.float32)


def test_resize_at_own_grid_is_identity():
  pos = _posemb(14)
  np.testing.assert_array_equal(vit.resize_pos_embed(pos, 14), pos)
  np.testing.assert_allclose(vit.bicubic_matrix(7, 7), np.eye(7), atol=1e-12)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", [(14, 18), (7, 5), (3, 8), (14, 13), (16, 7)])
def test_resize_matches_torch_bicubic(old, new, antialias):
  """Against torch.nn.functional.interpolate(bicubic, align_corners=False), the resize the
  reference code applies (224 -> 288 px is 14 -> 18 patches), and the same with antialias,
  timm's (a BiomedCLIP trunk at another size), which differs when growing too."""
  pos = _posemb(old, seed=old)
  ours = vit.resize_pos_embed(pos, new, antialias=antialias)
  grid = torch.from_numpy(pos[1:]).reshape(1, old, old, -1).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                        align_corners=False, antialias=antialias)
  ref = ref.permute(0, 2, 3, 1).reshape(new * new, -1).numpy()
  assert ours.shape == (1 + new * new, 8)
  np.testing.assert_array_equal(ours[0], pos[0])  # The CLS embedding is kept as it is.
  np.testing.assert_allclose(ours[1:], ref, atol=1e-5)


def test_resize_rejects_non_square_grid():
  with pytest.raises(ValueError, match="not a square grid"):
    vit.resize_pos_embed(np.zeros((1 + 12, 4), np.float32), 4)


def test_wrong_image_size_is_reported():
  module = VisionTransformer(image_size=32, patch_size=8, width=16, depth=1, num_heads=2,
                             mlp_dim=32)
  params = towers.init_params(module, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="expected images of 32x32"):
    module.apply({"params": params}, jnp.zeros((1, 48, 48, 3)))


def test_uint8_pixels_are_normalised_like_the_clip_image_processor():
  """The pipeline ships uint8 pixels and the tower normalises them: the same numbers as
  transformers' CLIPImageProcessor (rescale by 1/255, CLIP mean and std), to float32
  rounding, and the same tower output as the processor's floats. Floats pass through."""
  import transformers
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)
  ref = processor(images=list(pixels), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = vit.normalize(jnp.asarray(pixels))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  np.testing.assert_array_equal(vit.normalize(jnp.asarray(ref)), ref)
  module = VisionTransformer(image_size=32, patch_size=8, width=16, depth=1, num_heads=2,
                             mlp_dim=32)
  params = towers.init_params(module, jax.random.PRNGKey(0))
  from_bytes = module.apply({"params": params}, pixels)["pooled"]
  from_floats = module.apply({"params": params}, ref)["pooled"]
  np.testing.assert_allclose(from_bytes, from_floats, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit_clip", "vit_timm", "clip_text", "bert"])
def test_bfloat16_compute_stays_close_to_float32(kind):
  """Params stay float32; bf16 compute of the pooled output is within 2e-2 relative error."""
  if kind.startswith("vit"):
    style = vit.STYLES[kind.split("_")[1]]
    make = lambda dt: VisionTransformer(image_size=64, patch_size=16, width=128, depth=4,
                                        num_heads=4, mlp_dim=256, proj_dim=64, dtype=dt, **style)
    inputs = (jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3)),)
  else:
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 1, 999)
    mask = (jnp.arange(24)[None] < jnp.array([[24], [17], [9], [3]])).astype(jnp.int32)
    inputs = (ids, mask)
    cls = ClipTextTransformer if kind == "clip_text" else BertEncoder
    make = lambda dt: cls(vocab_size=1000, width=128, depth=4, num_heads=4, mlp_dim=256,
                          dtype=dt, **({"context_length": 32} if kind == "clip_text"
                                       else {"max_positions": 32}))
  f32, b16 = make(jnp.float32), make(jnp.bfloat16)
  params = towers.init_params(f32, jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(towers.init_params(b16, jax.random.PRNGKey(0))))
  ref = f32.apply({"params": params}, *inputs)
  low = b16.apply({"params": params}, *inputs)
  assert low["pooled"].dtype == jnp.bfloat16
  assert rel_err(low["pooled"], ref["pooled"]) < 2e-2
  if "embedding" in ref:
    assert rel_err(low["embedding"], ref["embedding"]) < 2e-2


def test_patch_and_image_sizes_that_make_no_grid_are_named():
  """A patch size of 0 was a ZeroDivisionError; an image smaller than a patch, or not a
  whole number of them, is named too."""
  for image_size, patch_size, message in (
      (64, 0, r"patch_size 0 and image_size 64: a patch is 1 pixel or more"),
      (4, 8, r"patch_size 8 and image_size 4: .* the image at least one patch"),
      (60, 8, r"image_size 60 is not a multiple of patch_size 8")):
    with pytest.raises(ValueError, match=message):
      VisionTransformer(image_size=image_size, patch_size=patch_size, width=8, depth=1,
                        num_heads=2, mlp_dim=16).grid
  assert VisionTransformer(image_size=64, patch_size=8, width=8, depth=1, num_heads=2,
                           mlp_dim=16).grid == 8
