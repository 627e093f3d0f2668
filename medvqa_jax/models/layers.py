"""Building blocks shared by the towers: attention, MLP, transformer blocks.

Parameter names are part of the checkpoint format (the importers write to them), so
every submodule is named explicitly. Parameters are float32; `dtype` is the compute dtype.

`Compute` says *how* the stacks compute (attention kernel, scanned layers, rematerialisation),
never *what*: every setting gives the same outputs up to rounding and the same parameter tree,
so checkpoints move freely between settings. With dropout on (training), scanned and
rematerialised stacks draw their masks from other keys: the same distribution, other draws.
One exception: a query row whose keys are all masked gets a mean of values it must not read,
over another count of them on each kernel. The model's inputs hold none: every text has its
[CLS], and an empty answer prior is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Additive mask value: large enough to zero a softmax entry, small enough that a row whose
# keys are all masked stays finite (the softmax of such a row is uniform, never NaN).
_MASK_VALUE = -1e9
log = logging.getLogger(__name__)
_WARNED: set = set()  # (head dim, pad_to) that attention=auto fell back for, warned once.


@jax.custom_vjp
def quick_gelu(x):
  """x sigmoid(1.702 x), the approximation of GELU that OpenAI CLIP was trained with. Its
  gradient, s + 1.702 x s (1 - s) with s = sigmoid(1.702 x), keeps only x for the backward
  pass (computed in float32 and rounded once), as `exact_gelu`'s does: autodiff keeps the
  sigmoid and more, arrays the size of the MLP's hidden layer. XLA recomputes them inside its
  fusions when the layers are unrolled, but a scanned stack (`Compute.scan`) stores each, for
  every layer: compiled for an H200, towers_only at 256 with scan kept 8.7 GiB more and moved
  38 GB more per step (BENCHMARKS.md)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _quick_gelu_fwd(x):
  return quick_gelu(x), x


def _quick_gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  s = jax.nn.sigmoid(1.702 * x32)
  return ((g.astype(jnp.float32) * (s + 1.702 * x32 * s * (1 - s))).astype(g.dtype),)


quick_gelu.defvjp(_quick_gelu_fwd, _quick_gelu_bwd)


@jax.custom_vjp
def exact_gelu(x):
  """x Phi(x), Phi the standard normal's CDF (BERT's "gelu"). Its gradient keeps only x for
  the backward pass: autodiff of `jax.nn.gelu` also keeps erfc(-x / sqrt 2), an array the size
  of the MLP's hidden layer written in the forward pass and read in the backward. Compiled
  for an H200, that was 1.9 GB of a fine-tuning step's traffic at 64 and 1.4 GiB of its memory
  (4.2 GB and 2.0 GiB in stage 1). The gradient, Phi(x) + x phi(x), is computed in float32 and
  rounded once."""
  return jax.nn.gelu(x, approximate=False)


def _exact_gelu_fwd(x):
  return exact_gelu(x), x


def _exact_gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * jax.lax.erfc(x32 * -0.7071067811865476)
  pdf = jnp.exp(-0.5 * x32 * x32) * 0.3989422804014327  # 1 / sqrt(2 pi)
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(g.dtype),)


exact_gelu.defvjp(_exact_gelu_fwd, _exact_gelu_bwd)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _layer_norm(x, scale, bias, eps: float, dtype):
  """flax.linen.LayerNorm's arithmetic: statistics in float32 (the variance as E[x^2] -
  E[x]^2, clipped at 0), then (x - mean) * (rsqrt(var + eps) * scale) + bias, cast to dtype.
  The mean and the reciprocal deviation are named for `_remat_layer_norm`'s policy."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean)
  mean = checkpoint_name(mean, "layer_norm_statistics")
  inv = checkpoint_name(jax.lax.rsqrt(var + eps), "layer_norm_statistics")
  return ((x32 - mean) * (inv * scale) + bias).astype(dtype)


# The backward pass of a layer norm, as autodiff writes it, but from its input and its two
# per-row statistics only. Unrolled, XLA chooses what to keep and fuses the rest into the
# backward's kernels (the same program as without this, prevent_cse=False putting no barrier
# between the passes); a scanned stack (`Compute.scan`) stores what the backward reads for
# every layer, and without this that was float32 arrays of the input's size (x - mean, the
# normalised x): compiled for an H200, towers_only at 256 with scan kept 10.9 GiB more and
# moved 45 GB more per step (BENCHMARKS.md).
_remat_layer_norm = jax.checkpoint(
    _layer_norm, static_argnums=(3, 4), prevent_cse=False,
    policy=jax.checkpoint_policies.save_only_these_names("layer_norm_statistics"))


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm over the last axis (the same parameters, "scale" and "bias" in
  float32, and the same arithmetic), whose backward pass keeps only the input and the
  per-row statistics (`_remat_layer_norm`). dtype: of the result (None: x's, promoted with
  the float32 parameters, as flax does)."""
  epsilon: float = 1e-6
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
    dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
    return _remat_layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


def l2_normalize(x, eps: float = 1e-12):
  """x / max(|x|, eps) along the last axis, in float32. Written with rsqrt so that its
  gradient at x = 0 is finite too: the gradient of `x / max(norm(x), eps)` is NaN there
  (the norm's is 0/0), and a NaN reaches the parameters even through a masked-out token."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def activation(name: str) -> Callable:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# The forward primitive of `jax.nn.dot_product_attention(implementation="cudnn")`, bound in
# its custom_vjp's forward rule: its outputs (the attention and the softmax's statistics)
# are what the backward kernel reads.
FUSED_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper",)


def _fused_attention_saveable(prim, *_, **__) -> bool:
  return prim.name in FUSED_ATTENTION_FORWARD


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # Keep only each layer's input.
    # Keep the weight matmuls' outputs and the fused attention kernel's: compiled for an
    # H200, towers_only at 256 otherwise runs cuDNN's forward kernel again in the backward
    # pass (5.0 GB more traffic, a third more attention work; BENCHMARKS.md).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _fused_attention_saveable),
}
ATTENTION = ("reference", "xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class Compute:
  """How transformer stacks compute.

  attention: "reference" (two einsums around a float32 softmax; the only one that can return
    the attention weights, so calls asking for them always use it), "xla" or "cudnn"
    (`jax.nn.dot_product_attention` with that implementation; cudnn is the fused flash kernel:
    GPU, bf16/fp16 only), "auto" (cudnn on a GPU with a 16-bit compute dtype where the kernel
    takes the head dim and pad_to, see `cudnn_supports`; else reference).
  pad_to: the fused kernels see token counts padded to a multiple of this; the pads are
    masked and cut off again (cuDNN's kernels want aligned lengths).
  scan: run each stack's layers as one `lax.scan` over the layers' parameters stacked on the
    fly (the per-layer parameter names stay), so a stack compiles once, not once per layer.
  remat: "none", "full" (keep each layer's input, recompute the layer in the backward pass)
    or "dots" (keep the weight matmuls' outputs and the fused attention kernel's, recompute
    the rest).
  """
  attention: str = "reference"
  pad_to: int = 16
  scan: bool = False
  remat: str = "none"

  def __post_init__(self):
    if self.attention not in ATTENTION:
      raise ValueError(f"unknown attention {self.attention!r}; expected one of {ATTENTION}")
    if self.remat != "none" and self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat {self.remat!r}; expected none or one of "
                       f"{sorted(REMAT_POLICIES)}")
    if self.pad_to < 1:
      raise ValueError(f"pad_to must be >= 1, got {self.pad_to}")

  def kernel(self, dtype, head_dim: int | None = None, capability: str | None = None) -> str:
    """The attention implementation used for a compute dtype (and head dim, where known) on
    the default backend, or on a GPU of compute `capability` (compiling for one: aot.py).
    "auto" keeps the reference where cuDNN's flash kernel would refuse the call
    (`cudnn_supports`)."""
    if self.attention != "auto":
      return self.attention
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if capability is None:
      if jax.default_backend() != "gpu":
        return "reference"
      capability = getattr(jax.devices()[0], "compute_capability", None)
    if not half:
      return "reference"
    if cudnn_supports(head_dim, self.pad_to, capability):
      return "cudnn"
    if (head_dim, self.pad_to) not in _WARNED:
      _WARNED.add((head_dim, self.pad_to))
      log.warning("attention=auto: cuDNN's flash kernel does not take head dim %s with "
                  "pad_to %d on this GPU (compute capability %s); using the reference",
                  head_dim, self.pad_to, capability)
    return "reference"


def cudnn_supports(head_dim: int | None, pad_to: int, capability: str | None) -> bool:
  """Whether cuDNN's flash attention (bf16/fp16) takes the calls `fused_attention` makes:
  a head dim that is a multiple of 8, up to 256 from Hopper (compute capability 9.0) and 128
  before; an even `pad_to`, since a dense mask in training needs even token counts. head_dim
  None: not known, taken as supported."""
  try:
    hopper = capability is not None and float(capability) >= 9.0
  except ValueError:
    hopper = False
  heads_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= (256 if hopper else 128))
  return heads_ok and pad_to % 2 == 0


def pad_tokens(x, pad_to: int):
  """x (B, L, ...) with zeros appended along L up to a multiple of `pad_to`."""
  n = -x.shape[1] % pad_to
  return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)) if n else x


def fused_attention(q, k, v, bias, implementation: str, pad_to: int, kv_lengths=None,
                    causal: bool = False, keys: int | None = None):
  """softmax(q k^T / sqrt(d) + mask) v through `jax.nn.dot_product_attention`.

  q (B, Lq, H, D), k/v (B, Lk, H, D). The mask is either `bias` as `attention_bias` makes it
  (0 or the mask value, over the real queries and keys; turned into a dense boolean mask) or,
  the kernels' fast path, key lengths `kv_lengths` (B or 1,) (keys j >= length hidden) and/or
  `causal`. Lengths are padded to a multiple of `pad_to`: padded keys are hidden (by sequence
  lengths when there is no dense mask) and padded queries cut. keys: the real keys, where the
  caller padded k and v already (`MultiHeadAttention` pads its inputs); the output then keeps
  every query row given, for the caller to cut.
  """
  b, lq = q.shape[:2]
  lk = k.shape[1] if keys is None else keys
  q, k, v = pad_tokens(q, pad_to), pad_tokens(k, pad_to), pad_tokens(v, pad_to)
  if bias is None:
    if kv_lengths is not None:
      k_len = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (b,))
    else:
      k_len = jnp.full((b,), lk, jnp.int32) if k.shape[1] > lk else None
    # Padded query rows attend like any other and are cut: no query lengths needed.
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=k_len, is_causal=causal,
                                       implementation=implementation)
  else:
    # A mask of the real query rows; one that hides keys only serves every row, pads too.
    rows = q.shape[1] if bias.shape[-2] == 1 else bias.shape[-2]
    mask = jnp.broadcast_to(bias > _MASK_VALUE / 2, (b, 1, rows, lk))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q.shape[1] - rows),
                          (0, k.shape[1] - lk)))  # Pads: False, never attended.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out[:, :lq]


def run_layers(parent: nn.Module, indices: Sequence[int],
               blocks: Mapping[str, tuple[Callable[..., nn.Module], str]],
               body: Callable, carry, compute: Compute, plain: bool = False):
  """Runs the layers `indices` of a stack: carry = body(layer, carry) for each, where
  layer[role] is the layer's block of that role.

  blocks: role -> (make, name format): make(name=...) builds the block (a child of `parent`
    named name.format(i)); make(parent=None) must build the same block unbound.
  With compute.scan or remat (and not `plain`, nor while initialising, which creates the
  per-layer parameters), the blocks are applied functionally to the parent's per-layer
  parameters: stacked and scanned, and/or under `jax.checkpoint`. The parameter tree is the
  same either way.
  """
  indices = list(indices)
  if plain or parent.is_initializing() or not indices or (
      not compute.scan and compute.remat == "none"):
    for i in indices:
      layer = {role: make(name=fmt.format(i)) for role, (make, fmt) in blocks.items()}
      carry = body(layer, carry)
    return carry
  templates = {role: make(parent=None) for role, (make, _) in blocks.items()}
  params = parent.variables["params"]
  per_layer = [{role: params[fmt.format(i)] for role, (_, fmt) in blocks.items()}
               for i in indices]
  # Applied functionally, the blocks draw dropout from explicit keys: one per layer and role.
  if parent.has_rng("dropout"):
    keys = jax.random.split(parent.make_rng("dropout"), len(indices) * len(templates))
    keys = keys.reshape(len(indices), len(templates), *keys.shape[1:])
    per_layer = [(layer_params, layer_keys) for layer_params, layer_keys in zip(per_layer, keys)]
  else:
    per_layer = [(layer_params, None) for layer_params in per_layer]
  roles = list(templates)

  def apply(role, inputs, *args, **kwargs):
    layer_params, layer_keys = inputs
    rngs = None if layer_keys is None else {"dropout": layer_keys[roles.index(role)]}
    return templates[role].apply({"params": layer_params[role]}, *args, rngs=rngs, **kwargs)

  def step(carry, inputs):
    layer = {role: functools.partial(apply, role, inputs) for role in templates}
    return body(layer, carry)

  if compute.remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[compute.remat],
                          prevent_cse=not compute.scan)
  if compute.scan:
    # A scan's carry keeps its type; a stack whose first layer changes it (float32 in, the
    # compute dtype out) runs that layer before the scan: the same operations as unrolled.
    out = jax.eval_shape(step, carry, per_layer[0])
    if jax.tree.map(lambda x: (x.shape, x.dtype), out) != jax.tree.map(
        lambda x: (jnp.shape(x), jnp.result_type(x)), carry):
      carry, per_layer = step(carry, per_layer[0]), per_layer[1:]
      if not per_layer:
        return carry
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    carry, _ = jax.lax.scan(lambda c, p: (step(c, p), None), carry, stacked)
    return carry
  for layer_params in per_layer:
    carry = step(carry, layer_params)
  return carry


@flax.struct.dataclass
class Mask:
  """An attention mask in the forms the kernels take.

  bias: the additive bias of `attention_bias` (the reference kernel, and any fused kernel when
    the mask is not structured).
  kv_lengths: (B,) int32 real-key counts, or None (no key padding).
  causal: position i attends only to positions <= i.
  structured: the mask is exactly `causal` and/or "keys j >= kv_lengths[b] are hidden", so the
    fused kernels take lengths and a causal flag instead of a dense mask (no bias tensor is
    read, and the causal kernel skips the hidden blocks).
  """
  bias: jax.Array
  kv_lengths: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  structured: bool = flax.struct.field(pytree_node=False, default=False)


def attention_mask(key_mask=None, causal_len: int | None = None,
                   right_padded: bool = False) -> Mask | None:
  """`attention_bias`'s mask as a `Mask`; None when there is nothing to mask.

  right_padded: the caller guarantees that each row of `key_mask` is ones then zeros (the
    tokenizer's right padding), so the fused kernels may use key lengths. Without it a key
    mask is passed to them densely. A concrete mask (outside jit) that breaks the guarantee
    is refused; a traced one cannot be checked.
  """
  if (right_padded and key_mask is not None and not isinstance(key_mask, jax.core.Tracer)
      and getattr(key_mask, "is_fully_addressable", True)):  # (Not another host's rows.)
    rises = np.diff(np.asarray(key_mask).astype(np.int8), axis=-1) > 0  # A 0 then a 1.
    if rises.any():
      row = int(np.flatnonzero(rises.reshape(-1, rises.shape[-1]).any(-1))[0])
      raise ValueError(
          f"attention mask row {row} is not right-padded (its real tokens, 1, then padding, "
          "0): the fused attention kernels read a mask as lengths, and would attend to its "
          "padding. Pad on the right, as this package's tokenizers do")
  bias = attention_bias(key_mask, causal_len)
  if bias is None:
    return None
  lengths = None
  if key_mask is not None:
    lengths = jnp.sum(jnp.asarray(key_mask).astype(jnp.int32), axis=-1)
  return Mask(bias, lengths, causal_len is not None, right_padded or key_mask is None)


def segment_mask(segment_ids, causal: bool = False) -> Mask:
  """The mask of rows packed with several sequences: `segment_ids` (B, L) numbers each
  token's sequence (runs of equal ids), and a token attends only to its own sequence's
  tokens (causal: those at its position or before). Padding must be a segment of its own, so
  that no query row is wholly masked."""
  allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    length = segment_ids.shape[1]
    allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None]
  return Mask(jnp.where(allowed, 0.0, _MASK_VALUE)[:, None].astype(jnp.float32))


def segment_positions(segment_ids):
  """Each token's position within its segment (runs of equal ids along axis 1)."""
  index = jnp.arange(segment_ids.shape[1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


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


class Projection(nn.Module):
  """`nn.DenseGeneral`'s parameters and product, its bias added (`add_bias`) or left to the
  caller: the last `in_axes` axes of x onto `features`, with kernel (*inputs, *features)
  (initialised as nn.DenseGeneral does, over the flattened (inputs, features) matrix) and
  bias (*features,), named as it names them, so that checkpoints, importers and FSDP rules
  see no difference. Returns (x . kernel [+ bias] in the compute dtype, kernel, bias), the
  parameters as stored.

  The product is one 2-D matrix product over the flattened axes (row-major reshapes, free).
  Contracting the kernel's own axes (768 x (12, 64)) left XLA's GPU compiler to make the
  kernel's gradient in another layout: the optimiser then read it through transposes (3.2 GB
  of a fine-tuning step's traffic at 64 on an H200).

  A bias added to the (..., 12, 64) result was broadcast to the product's shape as cuBLAS's
  C operand (written, then read), and reduced from its gradient. Added to the 2-D product as
  a vector along its columns (`add_bias`, the query's), it goes into cuBLASLt's epilogue;
  the key's and value's are placed where they cost less still (`MultiHeadAttention`)."""
  features: tuple[int, ...]
  in_axes: int = 1
  dtype: Dtype = jnp.float32
  add_bias: bool = False

  @nn.compact
  def __call__(self, x):
    inputs = x.shape[x.ndim - self.in_axes:]
    init = nn.initializers.lecun_normal()  # nn.DenseGeneral's.
    flat = (math.prod(inputs), math.prod(self.features))
    kernel = self.param("kernel", lambda rng, shape: init(rng, flat).reshape(shape),
                        (*inputs, *self.features))
    bias = self.param("bias", nn.initializers.zeros, self.features)
    xc, kc = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    lead = x.shape[:x.ndim - self.in_axes]
    y = jnp.dot(xc.reshape(*lead, flat[0]), kc.reshape(flat))
    if self.add_bias:
      y = y + bias.reshape(flat[1]).astype(y.dtype)
    return y.reshape(*lead, *self.features), kernel, bias


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate query/key/value/out projections, all with biases.
  Two biases are placed where they cost least (`Projection`), with the same outputs: a key
  bias b adds q . b to every logit of a query's row, which the softmax takes away, so it is
  not applied (and its gradient is exactly zero, where autodiff gave it rounding noise that
  Adam's normalisation turned into steps of the learning rate's size); and since each row of
  attention weights sums to 1, a value bias passes through them unchanged, so it joins the
  out projection's as b_out + b_value . W_out.

  x (B, Lq, D); kv (B / G, Lk, Dkv), defaulting to x. A context with fewer rows than x is
  shared by groups of G consecutive rows of x (a batch-1 context by the whole batch; a
  question's context by its G candidate answers): its keys and values are projected once per
  group, and each group's queries attend to them as one sequence of G * Lq (the mask must
  then hide keys only, as a context's padding mask does).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x, kv=None, bias=None, return_weights: bool = False):
    """bias: None, an additive bias (`attention_bias`) or a `Mask` (`attention_mask`)."""
    mask = bias if isinstance(bias, Mask) else None
    bias = mask.bias if mask is not None else bias
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    kernel = self.compute.kernel(self.dtype, head_dim)
    fused = kernel != "reference" and not return_weights
    tokens, keys = x.shape[1], (x if kv is None else kv).shape[1]
    if fused:
      # The fused kernels take token counts padded to pad_to. Padding the inputs, not q, k
      # and v, lets the pads join the kernels that make x and kv (a layer norm, an add), and
      # the cut the one that reads the output; padding q, k and v took passes of their own,
      # and cutting the output and (backward) the three gradients: 21 GB of a towers_only
      # step's traffic at 256 on an H200 (BENCHMARKS.md), for 2% more projection work.
      x, kv = pad_tokens(x, self.compute.pad_to), (
          None if kv is None else pad_tokens(kv, self.compute.pad_to))
    kv = x if kv is None else kv
    heads = (self.num_heads, head_dim)
    q, _, _ = Projection(heads, dtype=self.dtype, add_bias=True, name="query")(x)
    k, _, _ = Projection(heads, dtype=self.dtype, name="key")(kv)  # The softmax cancels it.
    v, _, v_bias = Projection(heads, dtype=self.dtype, name="value")(kv)
    (b, lq), rows = q.shape[:2], k.shape[0]
    groups = b // rows
    if groups * rows != b:
      raise ValueError(f"a context of {rows} rows cannot be shared by {b} query rows")
    if groups > 1:
      if bias is not None and bias.shape[-2] != 1:
        raise ValueError("a shared context's mask may hide keys only")
      q = q.reshape(rows, groups * lq, *q.shape[2:])
    if not fused:
      # Logits and softmax in float32 whatever the compute dtype.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                          preferred_element_type=jnp.float32) * (head_dim ** -0.5)
      if bias is not None:
        logits = logits + bias
      weights = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    else:
      weights = None
      if mask is not None and mask.structured:
        out = fused_attention(q, k, v, None, kernel, self.compute.pad_to, mask.kv_lengths,
                              mask.causal, keys=keys)
      else:
        out = fused_attention(q, k, v, bias, kernel, self.compute.pad_to, keys=keys)
    if groups > 1:
      out = out.reshape(b, lq, *out.shape[2:])
      if weights is not None:  # (rows, H, G * Lq, Lk) -> (B, H, Lq, Lk)
        weights = weights.reshape(rows, weights.shape[1], groups, lq, -1)
        weights = weights.transpose(0, 2, 1, 3, 4).reshape(b, -1, lq, weights.shape[-1])
    out, w_out, b_out = Projection((width,), 2, self.dtype, name="out")(out)
    # The value bias, past the weights (each row sums to 1), joins the out projection's.
    out = out + (b_out + jnp.einsum("hk,hkd->d", v_bias, w_out)).astype(out.dtype)
    out = out[:, :tokens]  # The padded query rows (fused kernels) cut.
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
  """x + attn(ln_1(x)); x + mlp(ln_2(x)): the block of CLIP and timm ViTs.

  The MLP's half runs on x as a (tokens, width) matrix, the shape of its matrix products.
  XLA's GPU compiler adds a residual to fc2's product in cuBLASLt's epilogue (as its C
  operand), and lets the product overwrite it when nothing else reads the instruction that
  gives it. Given x through a reshape, read by that add alone, it did, and then had to copy
  x first, since layer norm and the backward pass read it too: 12 copies of 77 MB (155 MB
  read and written) per towers_only step at 256 on an H200. As a matrix that the layer norm
  reads too, x is read in place."""
  num_heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  dtype: Dtype = jnp.float32
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x, bias=None):
    ln = lambda name: LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    attn = MultiHeadAttention(self.num_heads, self.dtype, self.compute, name="attn")
    x = x + attn(ln("ln_1")(x), bias=bias)
    rows = x.reshape(-1, x.shape[-1])
    rows = rows + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(ln("ln_2")(rows))
    return rows.reshape(x.shape)


def dropout(module: nn.Module, rate: float, x):
  """BERT's hidden dropout: active when the module is applied with a "dropout" rng (training),
  the identity otherwise (evaluation, initialisation). Each element is dropped with
  probability `rate` in steps of 2^-16 (0.1: 0.1000061) and the others are scaled by the
  inverse of that probability's complement, so the expectation is kept exactly (`keep_mask`)."""
  if rate == 0 or not module.has_rng("dropout"):
    return x
  keep, keep_prob = keep_mask(module.make_rng("dropout"), rate, x.shape)
  return jax.lax.select(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def keep_mask(key, rate: float, shape) -> tuple:
  """(mask of the elements kept, their probability): 16 random bits per element, in steps of
  2^-16 of the rate. A ThreeFry key (`train.rng`'s default) hashes one 64-bit counter per four
  elements in-line (`threefry2x32`): the bits of `jax.random.bits(key, (..., ceil(n / 4)),
  uint64)`, each 64-bit draw split in four. XLA fuses the hash into the kernels that use the
  mask, where `jax.random.bits` runs it as a kernel of its own (on a GPU, with the kernel
  lowering the launch scripts choose, one that reads the keys and counters broadcast to the
  draw's shape) and XORs its two output words into one 32-bit draw, a further pass. Half the
  hashing of 32-bit draws, and compiled for an H200, 8.2 of a fine-tuning step's 145 GB of
  traffic gone, 18.2 of stage 1's 184 (BENCHMARKS.md). A key of another implementation (`rbg`) draws
  32-bit words through `jax.random.bits`, two elements each."""
  if not 0 <= rate < 1:
    raise ValueError(f"the dropout rate must be in [0, 1), got {rate}")
  drop = round(rate * 2 ** 16)  # An element is dropped where its 16 bits are below this.
  *lead, last = shape
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # Raw key data (PRNGKey's): the default implementation.
  if str(jax.random.key_impl(key)) == "threefry2x32":
    draws = (*lead, -(-last // 4))
    if math.prod(draws) >= 2 ** 32:
      raise ValueError(f"a dropout mask of shape {tuple(shape)} needs {math.prod(draws)} "
                       "64-bit draws; counters of 32 bits count at most 2^32")
    index = jnp.zeros(draws, jnp.uint32)
    for axis in range(len(draws)):
      stride = math.prod(draws[axis + 1:])
      index = index + jax.lax.broadcasted_iota(jnp.uint32, draws, axis) * jnp.uint32(stride)
    words = threefry2x32(jax.random.key_data(key), jnp.uint32(0), index)
  else:
    words = (jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32),)
  halves = [h.astype(jnp.uint16) for w in words for h in (w & 0xFFFF, w >> 16)]  # Low first.
  halves = jnp.stack(halves, axis=-1).reshape(*lead, -1)[..., :last]
  return halves >= drop, 1 - drop / 2 ** 16


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key, x0, x1):
  """The Threefry-2x32 hash with 20 rounds (Salmon et al., "Parallel random numbers: as easy
  as 1, 2, 3", 2011), JAX's PRNG: the two 32-bit words of the hash of counters (x0, x1) under
  `key` (two uint32 words), in plain jnp operations that XLA fuses with what reads them."""
  k0, k1 = key[0], key[1]
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):  # Five times four rounds, a key injection after each four.
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


class PostLNBlock(nn.Module):
  """The BERT layer, post-LN, with optional cross-attention (BERT's decoder layer, METER's
  co-attention layer):

    x = ln(x + attn(x));  [x = ln(x + cross_attn(q=x, kv=context))];  x = ln(x + mlp(x))

  `bias` masks self-attention; `context_bias` masks the context's keys. With
  `return_weights`, returns (x, cross-attention weights (B, heads, Lq, Lk)). `dropout`: BERT's
  hidden dropout on each sublayer's output before its residual sum, in training only.
  """
  num_heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  cross: bool = False
  dtype: Dtype = jnp.float32
  compute: Compute = Compute()
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, bias=None, context=None, context_bias=None, return_weights=False):
    ln = lambda name: LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    mha = lambda name: MultiHeadAttention(self.num_heads, self.dtype, self.compute, name=name)
    drop = lambda y: dropout(self, self.dropout, y)
    x = ln("attn_ln")(x + drop(mha("attn")(x, bias=bias)))
    weights = None
    if self.cross:
      if context is None:
        raise ValueError("a cross-attention layer needs a context")
      y = mha("cross_attn")(x, kv=context, bias=context_bias, return_weights=return_weights)
      y, weights = y if return_weights else (y, None)
      x = ln("cross_ln")(x + drop(y))
    x = ln("mlp_ln")(x + drop(Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(x)))
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
