"""BERT encoder (absolute positions, token types, post-LN) for BERT-family checkpoints.

Covers Bio_ClinicalBERT, PubMedBERT/BiomedBERT, MiniLM and BiomedCLIP's text trunk. The same
module is the generative answer head's decoder (`causal`, cross-attention from layer
`cross_from` on, `lm_head`), initialised from the text checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvqa_jax.models import layers


class BertEncoder(nn.Module):
  """Token ids (B, L) to tokens and a pooled feature.

  pooler: "dense" is HF BertModel's pooler (tanh(W h_cls + b)); "cls" is the CLS token of the
  last hidden state (BiomedCLIP's `cls_last_hidden_state_pooler`); "none" pools nothing.
  `attention_mask` (B, L) is 1 on real tokens and right-padded, as the tokenizer makes it
  (the fused attention kernels take it as lengths); `context_mask` may be any mask.
  causal: position i attends only to positions <= i (the decoder).
  cross_from: layers with this index and above (at least the last) cross-attend to
    `context` (B, Lc, D) whose padding is `context_mask` (HF's `encoder_hidden_states` /
    `encoder_attention_mask`); None: no cross-attention. A context of B / G rows is shared
    by groups of G consecutive rows (a question's by its candidate answers).
  context_width: the context's width D (None: `width`), which the cross-attention's key and
    value projections take as input (ALBEF's `encoder_width`).
  lm_head: BERT's masked-LM head (dense, GELU, LayerNorm, then the word embeddings
    transposed plus a bias) giving `logits` (B, L, vocab_size).
  dropout: BERT's hidden dropout (after the embeddings and in every layer), applied only when
    the module is applied with a "dropout" rng (training); set from the model config, not the
    checkpoint.

  Returns a dict: tokens (B, L, width) (HF's `last_hidden_state`), pooled (B, width) unless
  pooler is "none", embedding (B, proj_dim) when `proj_dim` is set, logits with `lm_head`.
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
  causal: bool = False
  cross_from: int | None = None
  context_width: int | None = None
  lm_head: bool = False
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()
  dropout: float = 0.0

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, context=None,
               context_mask=None, segment_ids=None, lm_logits: bool = True):
    """segment_ids (B, L): rows packed with several sequences (runs of equal ids, padding a
    run of its own), each read as if alone: positions restart at each segment and tokens
    attend within their own segment only. It replaces `attention_mask` in self-attention.

    lm_logits=False (with `lm_head`): no `logits`; `lm` holds what they are made of instead,
    (hidden (B, L, width) float32, embedding (vocab_size, width), bias (vocab_size,)) with
    logits = hidden @ embedding.T + bias, for a caller that needs only some positions' logits
    (training: those that predict a token, `heads.next_token_log_prob`) or a few at a time
    (ranking: `heads.next_token_log_prob_chunked`)."""
    _, length = input_ids.shape
    if self.cross_from is not None and not 0 <= self.cross_from < self.depth:
      raise ValueError(f"cross_from={self.cross_from} names no layer of a {self.depth}-layer "
                       "BERT: no layer would cross-attend to the context")
    if context is not None and context.shape[-1] != (self.context_width or self.width):
      raise ValueError(f"the context is {context.shape[-1]} wide but this BERT's cross-"
                       f"attention reads {self.context_width or self.width} (context_width)")
    if segment_ids is None and length > self.max_positions:
      raise ValueError(f"sequence length {length} exceeds max_positions {self.max_positions}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if segment_ids is None:
      positions = jnp.arange(length)[None]
      bias = layers.attention_mask(attention_mask, causal_len=length if self.causal else None,
                                   right_padded=True)
    else:
      # A run longer than the position table can only be padding (a packed row longer than
      # its candidates need; `AMiF.rank` refuses longer candidates): it reads the last
      # position, since an index past the table would embed as NaN and spread to the row.
      positions = jnp.minimum(layers.segment_positions(segment_ids), self.max_positions - 1)
      bias = layers.segment_mask(segment_ids, causal=self.causal)
    word_embed = nn.Embed(self.vocab_size, self.width, name="word_embed")
    x = (word_embed(input_ids)
         + nn.Embed(self.max_positions, self.width, name="pos_embed")(positions)
         + nn.Embed(self.type_vocab_size, self.width, name="type_embed")(token_type_ids))
    x = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="embed_ln")(x.astype(self.dtype))
    x = layers.dropout(self, self.dropout, x)
    # A context mask may have holes (the decoder's: text padding, then the image tokens).
    context_bias = layers.attention_mask(context_mask)
    # Layers without cross-attention, then (a decoder) those with it: one stack each.
    split = self.depth if self.cross_from is None else self.cross_from
    for indices, cross in ((range(split), False), (range(split, self.depth), True)):
      block = functools.partial(layers.PostLNBlock, self.num_heads, self.mlp_dim, self.act,
                                self.ln_eps, cross, self.dtype, self.compute, self.dropout)
      x = layers.run_layers(self, indices, {"layer": (block, "layer_{}")},
                            lambda layer, x: layer["layer"](x, bias, context, context_bias),
                            x, self.compute)
    out = {"tokens": x}
    if self.lm_head:
      h = nn.Dense(self.width, dtype=self.dtype, name="lm_dense")(x)
      h = layers.activation(self.act)(h)
      h = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="lm_ln")(h)
      lm_bias = self.param("lm_bias", nn.initializers.zeros, (self.vocab_size,))
      if lm_logits:
        out["logits"] = word_embed.attend(h.astype(jnp.float32)) + lm_bias
      else:
        out["lm"] = (h.astype(jnp.float32), word_embed.embedding, lm_bias)
    if self.pooler == "dense":
      out["pooled"] = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name="pooler")(x[:, 0]))
    elif self.pooler == "cls":
      out["pooled"] = x[:, 0]
    elif self.pooler != "none":
      raise ValueError(f"unknown pooler {self.pooler!r}; expected 'dense', 'cls' or 'none'")
    if self.proj_dim and "pooled" in out:
      out["embedding"] = layers.ProjectionHead(self.proj_kind, self.proj_dim, False, self.dtype,
                                               name="head")(out["pooled"])
    return out
