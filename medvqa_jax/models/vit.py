"""ViT image tower: OpenAI-CLIP style and timm style (the trunk inside BiomedCLIP).

The two differ only in a few switches, collected in `STYLES`:
  clip: pre-LN `ln_pre` after the embeddings, quick-GELU, LayerNorm eps 1e-5, no patch bias.
  timm: no pre-LN, exact GELU, LayerNorm eps 1e-6, biased patch embedding.
Both pool the CLS token after the final LayerNorm.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medvqa_jax.models import layers

STYLES = {
    "clip": dict(pre_norm=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False),
    "timm": dict(pre_norm=False, act="gelu", ln_eps=1e-6, patch_bias=True),
}


# OpenAI CLIP's pixel normalisation; BiomedCLIP and PubMedCLIP use the same constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images):
  """uint8 RGB pixels (B, H, W, 3) to CLIP-normalised float32; floats pass through (they are
  taken to be normalised already)."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


class VisionTransformer(nn.Module):
  """Images (B, H, W, 3) to tokens and a pooled CLS feature. Images are uint8 RGB pixels,
  normalised here (`normalize`: the input pipeline ships bytes, a quarter of the floats'
  size, and the device does the arithmetic), or floats already normalised.

  Returns a dict:
    encoded: (B, 1 + N, width) output of the last block (HF CLIP's `last_hidden_state`).
    tokens:  (B, 1 + N, width) the same after the final LayerNorm (timm's `forward_features`,
             what fusion consumes).
    pooled:  (B, width) the CLS token after the final LayerNorm.
    embedding: (B, proj_dim) the projected pooled feature, when `proj_dim` is set.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  pre_norm: bool = True
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  patch_bias: bool = False
  proj_dim: int | None = None
  proj_kind: str = "linear"
  proj_bias: bool = False
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()

  @property
  def grid(self) -> int:
    if not (self.patch_size >= 1 and self.image_size >= self.patch_size):  # (0: a division by 0.)
      raise ValueError(f"patch_size {self.patch_size} and image_size {self.image_size}: a "
                       "patch is 1 pixel or more, and the image at least one patch")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images):
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"expected images of {self.image_size}x{self.image_size}, "
                       f"got shape {images.shape}")
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
                name="patch_embed")(normalize(images).astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (self.width,))
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1 + self.grid ** 2, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
    x = x + pos.astype(x.dtype)
    if self.pre_norm:
      x = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    block = functools.partial(layers.PreLNBlock, self.num_heads, self.mlp_dim, self.act,
                              self.ln_eps, self.dtype, self.compute)
    x = layers.run_layers(self, range(self.depth), {"block": (block, "block_{}")},
                          lambda layer, x: layer["block"](x), x, self.compute)
    out = {"encoded": x}
    out["tokens"] = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
    out["pooled"] = out["tokens"][:, 0]
    if self.proj_dim:
      out["embedding"] = layers.ProjectionHead(self.proj_kind, self.proj_dim, self.proj_bias,
                                               self.dtype, name="head")(out["pooled"])
    return out


def _keys(x, a: float):
  """The Keys cubic convolution kernel at x (0 from |x| = 2 on)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _cubic_weights(t, a=-0.75):
  """Keys cubic convolution weights for offsets -1, 0, 1, 2 (a = -0.75 as in PyTorch)."""
  return np.stack([_keys(t + 1, a), _keys(t, a), _keys(1 - t, a), _keys(2 - t, a)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D bicubic resampling, half-pixel centres.

  antialias=False: `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`
  (Keys a = -0.75, edges clamped), which the reference code and Hugging Face's CLIP use to
  resize position embeddings. antialias=True: the same with `antialias=True`, timm's default
  (`resample_abs_pos_embed`): Keys a = -0.5, the kernel widened by the scale when shrinking,
  weights cut at the edges and renormalised (PIL's resampling).
  """
  m = np.zeros((n_out, n_in), np.float64)
  if antialias:
    scale = n_in / n_out
    support, inv = (2 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
    for i in range(n_out):
      centre = scale * (i + 0.5)
      lo = max(int(centre - support + 0.5), 0)
      hi = min(int(centre + support + 0.5), n_in)
      w = _keys((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
      if w.sum() != 0:
        m[i, lo:hi] = w / w.sum()
    return m
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  w = _cubic_weights(src - base)
  for j, offset in enumerate((-1, 0, 1, 2)):
    idx = np.clip(base + offset, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, j])
  return m


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix: int = 1,
                     antialias: bool = False) -> np.ndarray:
  """Resizes (num_prefix + g*g, D) position embeddings to a new_grid x new_grid grid.

  The prefix (CLS) embeddings are kept; the grid is resampled bicubically (`bicubic_matrix`).
  At the same grid the embeddings are returned unchanged.
  """
  pos_embed = np.asarray(pos_embed)
  prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"position embeddings of {grid.shape[0]} grid tokens are not a square grid")
  if old == new_grid:
    return pos_embed
  m = bicubic_matrix(old, new_grid, antialias)
  g = grid.reshape(old, old, -1).astype(np.float64)
  g = np.einsum("ij,jkd,lk->ild", m, g, m)
  return np.concatenate([prefix, g.reshape(new_grid * new_grid, -1).astype(pos_embed.dtype)])
