"""Gated Cross-Attention Module: fuses the answer-vocabulary prior into the fused tokens.

With Y the prior's word embeddings (no positions) and X the fused tokens
(concat(text, image)):

  Y0 = LN(Y + MHA(Y, Y, Y));   Yh = LN(FFN(Y0) + Y0)
  X' = LN(X + MHA(q=X, kv=Yh))
  G  = sigmoid(W X' + b)       (per token, per channel)
  Z  = G * X' + (1 - G) * X;   out = LN(FFN(Z) + Z)

Both FFNs are Linear -> ReLU -> Linear, as in the reference code's module (the towers and the
fusion use GELU). Two departures from that module, by choice:
- no dropout of attention probabilities (it drops 10% in training): no stack here drops them,
  since the fused attention kernels cannot, and a compute setting never changes what is
  computed;
- BERT's layer norm, (x - mean) / sqrt(var + eps), where its own divides by the unbiased
  standard deviation plus eps: outputs about a factor sqrt(D / (D - 1)) apart (1.0007 at D = 768),
  which the next layer's weights take up. No weights of that module were released to load.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax.models import layers

log = logging.getLogger(__name__)


class GatedCrossAttention(nn.Module):
  """x (B, L, D), prior (P, D) or (B, P, D), prior_mask (P,) or (B, P).

  Returns a dict: out (B, L, D), gate (B, L, D), prior (the encoded prior Yh) and, with
  `return_weights`, cross_weights (B, heads, L, P).
  """
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "relu"
  ln_eps: float = 1e-12
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()

  @nn.compact
  def __call__(self, x, prior, prior_mask=None, return_weights=False):
    b, _, d = x.shape
    # A prior shared by the batch (P, D) is encoded once, not once per example.
    prior = prior[None] if prior.ndim == 2 else prior
    if prior_mask is None:
      prior_mask = jnp.ones(prior.shape[:2], jnp.int32)
    elif prior_mask.ndim == 1:
      prior_mask = prior_mask[None]
    if prior.shape[-1] != d:
      # Only when the text tower is narrower or wider than fusion (not in the paper's setting).
      prior = nn.Dense(d, dtype=self.dtype, name="prior_proj")(prior)
    prior = prior.astype(self.dtype)
    ln = lambda name: layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    mha = lambda name: layers.MultiHeadAttention(self.num_heads, self.dtype, self.compute,
                                                 name=name)
    mlp = lambda name: layers.Mlp(self.mlp_dim, self.act, self.dtype, name=name)
    prior_bias = layers.attention_mask(prior_mask, right_padded=True)  # answer_prior pads last.

    y0 = ln("prior_attn_ln")(prior + mha("prior_attn")(prior, bias=prior_bias))
    yh = ln("prior_mlp_ln")(mlp("prior_mlp")(y0) + y0)
    # A shared prior stays batch-1: the cross-attention projects its keys and values once.
    attended = mha("cross_attn")(x, kv=yh, bias=prior_bias, return_weights=return_weights)
    attended, weights = attended if return_weights else (attended, None)
    x_prime = ln("cross_ln")(x + attended)
    gate = jax.nn.sigmoid(nn.Dense(d, dtype=self.dtype, name="gate")(x_prime))
    z = gate * x_prime + (1 - gate) * x
    rows = z.reshape(-1, d)  # The residual in the MLP's own shape (`layers.PreLNBlock`).
    out = ln("mlp_ln")(mlp("mlp")(rows) + rows).reshape(z.shape)
    out = {"out": out, "gate": gate, "prior": jnp.broadcast_to(yh, (b,) + yh.shape[1:])}
    if return_weights:
      out["cross_weights"] = weights
    return out


def answer_prior(answers, tokenizer, max_tokens: int,
                 multiple: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Token ids (P,) and mask of an answer vocabulary, the GCA's prior.

  The answers' word pieces (no special tokens), in the order the answers are given, each id
  kept once, at most `max_tokens` (a cap that leaves word pieces out is logged as a warning,
  naming how many answers lose some). P is their count padded up to a multiple of `multiple`
  (at most `max_tokens`): the prior costs what the answer set needs, in a few fixed shapes.
  `tokenizer` is a transformers tokenizer. Pass the training (+ validation) answers, as
  `splits.answer_set` gives them: the prior must never see test answers.
  """
  ids, seen, pieces = [], set(), []
  for answer in answers:
    pieces.append(tokenizer(str(answer), add_special_tokens=False)["input_ids"])
    for t in pieces[-1]:
      if t not in seen:
        seen.add(t)
        ids.append(t)
  if not ids:  # Every query of the prior would attend to masked keys only.
    raise ValueError(f"the answer prior is empty: the {len(pieces)} answers hold no word "
                     "piece")
  if len(ids) > max_tokens:
    kept = set(ids[:max_tokens])
    cut = sum(not kept.issuperset(p) for p in pieces)
    log.warning("the answer prior holds %d of the %d word pieces of the %d answers (answers "
                "with word pieces left out: %d); raise model.prior_max_tokens to keep them all",
                max_tokens, len(ids), len(pieces), cut)
  ids = ids[:max_tokens]
  length = min(max_tokens, max(1, -(-len(ids) // multiple)) * multiple)
  pad = tokenizer.pad_token_id or 0
  out = np.full((length,), pad, np.int32)
  out[:len(ids)] = ids
  mask = (np.arange(length) < len(ids)).astype(np.int32)
  return out, mask
