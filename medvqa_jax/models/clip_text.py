"""CLIP text transformer: causal pre-LN transformer pooled at the end-of-text token."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvqa_jax.models import layers


class ClipTextTransformer(nn.Module):
  """Token ids (B, L) to tokens and the pooled end-of-text feature.

  The pooled token is the first `eos_token_id` in each row, or, when `eos_token_id` is None,
  the highest id in the row (OpenAI's convention: end-of-text is the last vocabulary entry).
  `attention_mask` (B, L) is 1 on real tokens and right-padded, as the tokenizer makes it
  (the fused attention kernels take it as lengths).

  Returns a dict: tokens (B, L, width) after the final LayerNorm (HF's `last_hidden_state`),
  pooled (B, width), and embedding (B, proj_dim) when `proj_dim` is set.
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  eos_token_id: int | None = None
  proj_dim: int | None = None
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    _, length = input_ids.shape
    if length > self.context_length:
      raise ValueError(f"sequence length {length} exceeds context_length {self.context_length}")
    x = nn.Embed(self.vocab_size, self.width, name="token_embed")(input_ids)
    pos = self.param("pos_embed", nn.initializers.normal(0.01), (self.context_length, self.width))
    # Rows taken, not sliced: with a slice, XLA's GPU layout assignment (the token embedding's
    # scatter-add and the slice's batch reduction, both in the backward pass) laid out the
    # whole residual stream batch-minor, with a transpose around every layer norm and matrix
    # product (towers_only at 256 on an H200: 3 GB more traffic; BENCHMARKS.md).
    x = (x + jnp.take(pos, jnp.arange(length), axis=0)).astype(self.dtype)
    bias = layers.attention_mask(attention_mask, causal_len=length, right_padded=True)
    block = functools.partial(layers.PreLNBlock, self.num_heads, self.mlp_dim, self.act,
                              self.ln_eps, self.dtype, self.compute)
    x = layers.run_layers(self, range(self.depth), {"block": (block, "block_{}")},
                          lambda layer, x: layer["block"](x, bias), x, self.compute)
    x = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
    if self.eos_token_id is None:
      eot = jnp.argmax(input_ids, axis=-1)
    else:
      eot = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    out = {"tokens": x, "pooled": jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]}
    if self.proj_dim:
      out["embedding"] = layers.ProjectionHead("linear", self.proj_dim, False, self.dtype,
                                               name="head")(out["pooled"])
    return out
