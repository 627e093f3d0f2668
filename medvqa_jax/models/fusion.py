"""Co-attention fusion: two streams (text, image) of post-LN layers that cross-attend.

Layer i of each stream: self-attention -> cross-attention to the other stream's output of
layer i-1 -> FFN, each with residual + post-LayerNorm (a BERT layer with cross-attention, as
in METER and the reference code). Both streams update from the previous layer's pair.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvqa_jax.models import layers


class CoAttentionFusion(nn.Module):
  """Returns a dict: text (B, Lt, D), image (B, Li, D); with `return_weights`, also
  text_cross_weights / image_cross_weights: per layer, (B, heads, Lt, Li) / (B, heads, Li, Lt).
  """
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "gelu"
  ln_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text, text_mask, image, image_mask=None, return_weights=False):
    if image_mask is None:
      image_mask = jnp.ones(image.shape[:2], jnp.int32)
    text_bias, image_bias = layers.attention_bias(text_mask), layers.attention_bias(image_mask)
    block = lambda name: layers.PostLNBlock(self.num_heads, self.mlp_dim, self.act, self.ln_eps,
                                            cross=True, dtype=self.dtype, name=name)
    text_weights, image_weights = [], []
    for i in range(self.num_layers):
      new_text, tw = block(f"text_layer_{i}")(text, text_bias, image, image_bias, True)
      new_image, iw = block(f"image_layer_{i}")(image, image_bias, text, text_bias, True)
      text, image = new_text, new_image
      text_weights.append(tw)
      image_weights.append(iw)
    out = {"text": text, "image": image}
    if return_weights:
      out["text_cross_weights"] = text_weights
      out["image_cross_weights"] = image_weights
    return out
