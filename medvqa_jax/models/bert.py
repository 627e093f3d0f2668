"""BERT encoder (absolute positions, token types, post-LN) for BERT-family checkpoints.

Covers Bio_ClinicalBERT, PubMedBERT/BiomedBERT, MiniLM and BiomedCLIP's text trunk.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvqa_jax.models import layers


class BertEncoder(nn.Module):
  """Token ids (B, L) to tokens and a pooled feature.

  pooler: "dense" is HF BertModel's pooler (tanh(W h_cls + b)); "cls" is the CLS token of the
  last hidden state (BiomedCLIP's `cls_last_hidden_state_pooler`).

  Returns a dict: tokens (B, L, width) (HF's `last_hidden_state`), pooled (B, width), and
  embedding (B, proj_dim) when `proj_dim` is set.
  """
  vocab_size: int = 30522
  max_positions: int = 512
  type_vocab_size: int = 2
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "gelu"
  ln_eps: float = 1e-12
  pooler: str = "dense"
  proj_dim: int | None = None
  proj_kind: str = "linear"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    _, length = input_ids.shape
    if length > self.max_positions:
      raise ValueError(f"sequence length {length} exceeds max_positions {self.max_positions}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (nn.Embed(self.vocab_size, self.width, name="word_embed")(input_ids)
         + nn.Embed(self.max_positions, self.width, name="pos_embed")(jnp.arange(length))[None]
         + nn.Embed(self.type_vocab_size, self.width, name="type_embed")(token_type_ids))
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="embed_ln")(x.astype(self.dtype))
    bias = layers.attention_bias(attention_mask)
    for i in range(self.depth):
      x = layers.PostLNBlock(self.num_heads, self.mlp_dim, self.act, self.ln_eps, self.dtype,
                             name=f"layer_{i}")(x, bias)
    out = {"tokens": x}
    if self.pooler == "dense":
      out["pooled"] = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name="pooler")(x[:, 0]))
    elif self.pooler == "cls":
      out["pooled"] = x[:, 0]
    else:
      raise ValueError(f"unknown pooler {self.pooler!r}; expected 'dense' or 'cls'")
    if self.proj_dim:
      out["embedding"] = layers.ProjectionHead(self.proj_kind, self.proj_dim, False, self.dtype,
                                               name="head")(out["pooled"])
    return out
