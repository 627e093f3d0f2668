"""The part of an augmentation that runs on the accelerator, inside the jitted step.

The pre-training views' Gaussian blur is drawn on the host with the rest of the augmentation
(so a view stays a pure function of its position) but applied here: in PIL it was about a
third of the augmentation's host time (BENCHMARKS.md), and on an accelerator it is a
negligible fraction of the step. The blur is the last
photometric operation, and a horizontal flip commutes with a symmetric kernel under
edge-replicating borders, so applying it after the host's flip gives the same image.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from medvqa_jax.data import augment

# Taps either side of the centre: the Gaussian cut at 4 sigma of the largest sigma drawn.
RADIUS = math.ceil(4 * augment.BLUR_SIGMA[1])


def gaussian_weights(sigma: jnp.ndarray) -> jnp.ndarray:
  """(B,) sigmas -> (B, 2*RADIUS+1) normalised 1-D Gaussian taps; sigma 0 gives the identity."""
  d = jnp.arange(-RADIUS, RADIUS + 1, dtype=jnp.float32)
  s = jnp.asarray(sigma, jnp.float32)[:, None]
  w = jnp.exp(-0.5 * (d / jnp.where(s > 0, s, 1.0)) ** 2)
  w = jnp.where(s > 0, w, (d == 0).astype(jnp.float32))
  return w / w.sum(-1, keepdims=True)


def gaussian_blur(images: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
  """Blurs each uint8 (B, H, W, C) image with its own sigma (0: unchanged), separably, with
  edge-replicating borders; returns uint8, rounded, like the host's PIL ops. PIL's blur
  approximates the Gaussian with box filters: it agrees to a few grey levels inside, and
  differs by up to some 20 in the outermost rows of pixels.
  Sigmas above `augment.BLUR_SIGMA[1]` are cut at RADIUS taps."""
  w = gaussian_weights(sigma)
  x = images.astype(jnp.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (RADIUS, RADIUS)
    padded = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    x = sum(w[:, t, None, None, None] * lax.slice_in_dim(padded, t, t + n, axis=axis)
            for t in range(2 * RADIUS + 1))
  return jnp.round(jnp.clip(x, 0, 255)).astype(jnp.uint8)


def views(batch: dict, images: str = "images", blur: str = "blur") -> jnp.ndarray:
  """A batch's views under `images`, with the blur the host drew for them (`blur`: per-view
  sigmas, 0 for none) applied; unchanged when the batch carries no sigmas."""
  if blur not in batch:
    return batch[images]
  return gaussian_blur(batch[images], batch[blur])
