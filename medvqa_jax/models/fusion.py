"""Co-attention fusion: two streams (text, image) of post-LN layers that cross-attend.

Layer i of each stream: self-attention -> cross-attention to the other stream's output of
layer i-1 -> FFN, each with residual + post-LayerNorm (a BERT layer with cross-attention, as
in METER and the reference code). Both streams update from the previous layer's pair.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvqa_jax.models import layers


class CoAttentionFusion(nn.Module):
  """text_mask and image_mask are 1 on real tokens and right-padded (the fused attention
  kernels take them as lengths). Returns a dict: text (B, Lt, D), image (B, Li, D); with
  `return_weights`, also text_cross_weights / image_cross_weights: per layer,
  (B, heads, Lt, Li) / (B, heads, Li, Lt).
  """
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "gelu"
  ln_eps: float = 1e-12
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()
  dropout: float = 0.0  # BERT's hidden dropout in every layer, in training only.

  @nn.compact
  def __call__(self, text, text_mask, image, image_mask=None, return_weights=False):
    if image_mask is None:
      image_mask = jnp.ones(image.shape[:2], jnp.int32)
    # Both masks are right-padded (text: the tokenizer's padding; image: all ones).
    text_bias = layers.attention_mask(text_mask, right_padded=True)
    image_bias = layers.attention_mask(image_mask, right_padded=True)
    block = functools.partial(layers.PostLNBlock, self.num_heads, self.mlp_dim, self.act,
                              self.ln_eps, True, self.dtype, self.compute, self.dropout)
    text_weights, image_weights = [], []

    def layer(blocks, streams):  # Both streams update from the previous layer's pair.
      text, image = streams
      new_text = blocks["text"](text, text_bias, image, image_bias, return_weights)
      new_image = blocks["image"](image, image_bias, text, text_bias, return_weights)
      if return_weights:
        (new_text, tw), (new_image, iw) = new_text, new_image
        text_weights.append(tw)
        image_weights.append(iw)
      return new_text, new_image

    blocks = {"text": (block, "text_layer_{}"), "image": (block, "image_layer_{}")}
    text, image = layers.run_layers(self, range(self.num_layers), blocks, layer, (text, image),
                                    self.compute, plain=return_weights)
    out = {"text": text, "image": image}
    if return_weights:
      out["text_cross_weights"] = text_weights
      out["image_cross_weights"] = image_weights
    return out
