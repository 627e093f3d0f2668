"""Building blocks shared by the towers: attention, MLP, transformer blocks.

Parameter names are part of the checkpoint format (the importers write to them), so
every submodule is named explicitly. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Additive mask value: large enough to zero a softmax entry, small enough that a row whose
# keys are all masked stays finite (the softmax of such a row is uniform, never NaN).
_MASK_VALUE = -1e9


def quick_gelu(x):
  """The sigmoid approximation of GELU that OpenAI CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def attention_bias(key_mask=None, causal_len: int | None = None):
  """An additive attention bias of shape (B or 1, 1, Lq, Lk) from masks.

  key_mask: (B, Lk), 1/True for real tokens; padded keys get no attention.
  causal_len: if given, position i may attend only to positions <= i.
  Returns None when there is nothing to mask.
  """
  bias = None
  if key_mask is not None:
    bias = jnp.where(key_mask[:, None, None, :].astype(bool), 0.0, _MASK_VALUE)
  if causal_len is not None:
    causal = jnp.tril(jnp.ones((causal_len, causal_len), bool))
    causal = jnp.where(causal, 0.0, _MASK_VALUE)[None, None]
    bias = causal if bias is None else jnp.minimum(bias, causal)
  return None if bias is None else bias.astype(jnp.float32)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate query/key/value/out projections (all biased)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None, bias=None, return_weights: bool = False):
    kv = x if kv is None else kv
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, name=name)
    q = dense("query")(x)
    k = dense("key")(kv)
    v = dense("value")(kv)
    # Logits and softmax in float32 whatever the compute dtype.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    if bias is not None:
      logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return (out, weights) if return_weights else out


class Mlp(nn.Module):
  hidden: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    h = activation(self.act)(h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class PreLNBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)): the block of CLIP and timm ViTs."""
  num_heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias=None):
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    x = x + MultiHeadAttention(self.num_heads, self.dtype, name="attn")(ln("ln_1")(x), bias=bias)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(ln("ln_2")(x))
    return x


class PostLNBlock(nn.Module):
  """The BERT layer, post-LN, with optional cross-attention (BERT's decoder layer, METER's
  co-attention layer):

    x = ln(x + attn(x));  [x = ln(x + cross_attn(q=x, kv=context))];  x = ln(x + mlp(x))

  `bias` masks self-attention; `context_bias` masks the context's keys. With
  `return_weights`, returns (x, cross-attention weights (B, heads, Lq, Lk)).
  """
  num_heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  cross: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias=None, context=None, context_bias=None, return_weights=False):
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    mha = lambda name: MultiHeadAttention(self.num_heads, self.dtype, name=name)
    x = ln("attn_ln")(x + mha("attn")(x, bias=bias))
    weights = None
    if self.cross:
      if context is None:
        raise ValueError("a cross-attention layer needs a context")
      y, weights = mha("cross_attn")(x, kv=context, bias=context_bias, return_weights=True)
      x = ln("cross_ln")(x + y)
    x = ln("mlp_ln")(x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(x))
    return (x, weights) if return_weights else x


class ProjectionHead(nn.Module):
  """Projection of a pooled feature as the checkpoints define it.

  kind: "linear" (CLIP's visual/text projection, BiomedCLIP's image head) or
  "mlp" (open_clip's `hf_proj_type: mlp`: Linear -> exact GELU -> Linear, hidden
  width (in + out) // 2).
  """
  kind: str
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "linear":
      return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="proj")(x)
    if self.kind == "mlp":
      hidden = (x.shape[-1] + self.features) // 2
      x = nn.Dense(hidden, use_bias=self.use_bias, dtype=self.dtype, name="fc1")(x)
      x = exact_gelu(x)
      return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="fc2")(x)
    raise ValueError(f"unknown projection kind {self.kind!r}; expected 'linear' or 'mlp'")
