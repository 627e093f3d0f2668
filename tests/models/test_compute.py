"""The speed settings of layers.Compute change how the stacks compute, never what: fused
attention (padded and masked) vs the reference einsums, scanned vs unrolled layers,
rematerialised vs stored activations. Same parameter trees; outputs and gradients equal
within the tolerances stated per test (float32: 2e-5 absolute on O(1) values, what
reassociated float32 sums differ by; bfloat16: 3e-2, a few bf16 ulps of O(1) values)."""

import functools
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import max_diff, rel_err
from medvqa_jax.models import amif, layers
from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.fusion import CoAttentionFusion
from medvqa_jax.models.vit import VisionTransformer

F32_TOL, BF16_TOL = 2e-5, 3e-2
REFERENCE = layers.Compute()
# "xla" runs the same padding/masking code as "cudnn" (only the kernel differs), on CPU. On a
# GPU, MEDVQA_FUSED_ATTENTION=cudnn checks cuDNN's kernel itself (its 16-bit cases).
FUSED = layers.Compute(attention=os.environ.get("MEDVQA_FUSED_ATTENTION", "xla"), pad_to=16)


def _absmax(x) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64))))


def _close(a, b, tol):
  """|a - b| <= tol, relative to the largest magnitude in b when that exceeds 1."""
  return max_diff(a, b) <= tol * max(1.0, _absmax(b))


def _assert_grads_close(g_a, g_b, tol, what=""):
  """Gradient trees equal leaf by leaf (`_close`); the attention key biases' exactly zero on
  both sides (`layers.MultiHeadAttention` does not apply them)."""
  flat_a = dict(jax.tree_util.tree_flatten_with_path(g_a)[0])
  flat_b = jax.tree_util.tree_flatten_with_path(g_b)[0]
  assert set(flat_a) == {path for path, _ in flat_b}, what
  for path, b in flat_b:
    name, a = jax.tree_util.keystr(path), flat_a[path]
    if name.endswith("['key']['bias']"):
      assert not np.any(np.asarray(a)) and not np.any(np.asarray(b)), (what, name)
    assert _close(a, b, tol), (what, name)


def _mask(lengths, n):
  return (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


ATTENTION_CASES = {
    # name: (Lq, Lk, key lengths or None, causal)
    "self, padded keys, causal": (13, 13, [13, 9, 4], True),
    "cross, padded keys": (7, 11, [11, 5, 8], False),
    "no mask, lengths padded to 16": (13, 13, None, False),
    "no mask, aligned lengths": (16, 32, None, False),
}


# A masked case in both mask forms; an unmasked one has no mask to give.
CASE_FORMS = [(case, form) for case in sorted(ATTENTION_CASES)
              for form in (("dense bias", "lengths") if ATTENTION_CASES[case][2] is not None
                           or ATTENTION_CASES[case][3] else ("no mask",))]


@pytest.mark.parametrize("case,form", CASE_FORMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_fused_attention_matches_reference(case, form, dtype, tol):
  """form: the mask as a dense additive bias, or as a structured `Mask` (right-padded keys,
  causal), which the fused kernels take as key lengths and a causal flag."""
  if FUSED.attention == "cudnn" and dtype == jnp.float32:
    pytest.skip("cuDNN's fused attention takes 16-bit inputs only")
  lq, lk, lengths, causal = ATTENTION_CASES[case]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, lq, 32)).astype(np.float32)
  kv = x if lq == lk and lengths is not None and causal else rng.normal(
      size=(3, lk, 32)).astype(np.float32)
  bias = None
  if lengths is not None or causal:
    make = layers.attention_bias if form == "dense bias" else functools.partial(
        layers.attention_mask, right_padded=True)
    bias = make(None if lengths is None else _mask(lengths, lk),
                causal_len=lq if causal else None)
  ref = layers.MultiHeadAttention(4, dtype, REFERENCE)
  fused = layers.MultiHeadAttention(4, dtype, FUSED)
  params = ref.init(jax.random.PRNGKey(0), x, kv, bias)["params"]

  def loss(module, params):
    out = module.apply({"params": params}, x, kv, bias)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
  (l_ref, out_ref), g_ref = grad(ref, params)
  (l_fused, out_fused), g_fused = grad(fused, params)
  assert out_fused.shape == out_ref.shape == (3, lq, 32)
  assert max_diff(out_fused, out_ref) <= tol
  _assert_grads_close(g_fused, g_ref, tol)
  if lengths is not None:
    # Padded keys really are ignored: changing them changes nothing.
    noisy = kv.copy() if kv is not x else None
    if noisy is not None:
      noisy[np.asarray(_mask(lengths, lk)) == 0] = 100.0
      again = fused.apply({"params": params}, x, noisy, bias)
      assert max_diff(again, out_fused) <= tol


def test_a_mask_said_right_padded_that_is_not_is_refused_where_it_can_be_read():
  """The fused kernels read a right-padded mask as lengths: a left-padded one (another
  tokenizer's) attended to its padding silently. A concrete mask is checked, by BERT too."""
  from medvqa_jax.models.bert import BertEncoder
  left = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
  with pytest.raises(ValueError, match=r"attention mask row 1 is not right-padded"):
    layers.attention_mask(left, right_padded=True)
  assert layers.attention_mask(left).structured is False  # Not said: passed densely.
  assert layers.attention_mask(left[:, ::-1], right_padded=True).structured
  bert = BertEncoder(vocab_size=50, max_positions=8, width=16, depth=1, num_heads=2, mlp_dim=32,
                     compute=FUSED)
  ids = np.array([[5, 6, 7, 8], [0, 0, 7, 8]])
  params = bert.init(jax.random.PRNGKey(0), ids, left[:, ::-1])["params"]
  with pytest.raises(ValueError, match=r"row 1 is not right-padded .* Pad on the right"):
    bert.apply({"params": params}, ids, left)


@pytest.mark.parametrize("compute", [REFERENCE, FUSED], ids=["reference", "fused"])
@pytest.mark.parametrize("form", ["lengths", "holes"])
def test_a_context_shared_by_groups_of_rows_equals_it_repeated(compute, form):
  """A context of B rows for B * G queries (a question's for its G candidate answers) gives
  what the context repeated G times gives: outputs, gradients and attention weights."""
  dtype = jnp.bfloat16 if compute.attention == "cudnn" else jnp.float32
  tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
  rng = np.random.default_rng(3)
  g, lq, lk = 4, 5, 11
  x = rng.normal(size=(2 * g, lq, 32)).astype(np.float32)
  kv = rng.normal(size=(2, lk, 24)).astype(np.float32)
  key_mask = _mask([11, 6], lk) if form == "lengths" else np.array([[1] * 11, [1, 0, 1] + [1] * 8])
  make = lambda m: layers.attention_mask(m, right_padded=form == "lengths")
  mha = layers.MultiHeadAttention(4, dtype, compute)
  params = mha.init(jax.random.PRNGKey(0), x, np.repeat(kv, g, 0))["params"]

  def loss(params, kv, key_mask):
    out = mha.apply({"params": params}, x, kv, make(key_mask))
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, shared), g_shared = grad(params, kv, key_mask)
  (_, repeated), g_repeated = grad(params, np.repeat(kv, g, 0), np.repeat(key_mask, g, 0))
  assert shared.shape == (2 * g, lq, 32) and max_diff(shared, repeated) <= tol
  _assert_grads_close(g_shared, g_repeated, tol)
  _, w_shared = mha.apply({"params": params}, x, kv, make(key_mask), return_weights=True)
  _, w_repeated = mha.apply({"params": params}, x, np.repeat(kv, g, 0),
                            make(np.repeat(key_mask, g, 0)), return_weights=True)
  assert w_shared.shape == (2 * g, 4, lq, lk) and max_diff(w_shared, w_repeated) <= tol
  with pytest.raises(ValueError, match="a context of 2 rows cannot be shared by 7 query rows"):
    mha.apply({"params": params}, x[:7], kv, make(key_mask))


class _PlainAttention(nn.Module):
  """Attention as written: four biased nn.DenseGeneral projections, every bias in place."""
  num_heads: int

  @nn.compact
  def __call__(self, x, kv, key_mask):
    heads = (self.num_heads, x.shape[-1] // self.num_heads)
    q, k, v = (nn.DenseGeneral(heads, name=n)(t) for n, t in
               (("query", x), ("key", kv), ("value", kv)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(heads[1])
    weights = jax.nn.softmax(jnp.where(key_mask[:, None, None] == 1, logits, -1e9), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(out)


@pytest.mark.parametrize("compute", [REFERENCE, FUSED], ids=["reference", "fused"])
def test_the_key_and_value_biases_are_placed_where_they_cost_least(compute):
  """The key bias is not applied (the softmax cancels it) and the value bias joins the out
  projection's (each row of weights sums to 1): outputs equal the float64 formula that
  applies both in place, with both large; gradients equal those of attention as written
  (autodiff of nn.DenseGeneral projections), the key bias's exactly zero; the parameters are
  nn.DenseGeneral's, initialised alike."""
  dtype = jnp.bfloat16 if compute.attention == "cudnn" else jnp.float32
  tol = BF16_TOL if dtype == jnp.bfloat16 else F32_TOL
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 6, 32)).astype(np.float32)
  kv = rng.normal(size=(3, 9, 32)).astype(np.float32)
  key_mask = _mask([9, 4, 7], 9)
  mha = layers.MultiHeadAttention(4, dtype, compute)
  plain = _PlainAttention(4)
  params = mha.init(jax.random.PRNGKey(0), x, kv)["params"]
  chex.assert_trees_all_equal(params, plain.init(jax.random.PRNGKey(0), x, kv,
                                                 key_mask)["params"])
  params = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32) * 0.3,
                        params)
  params["key"]["bias"] = params["key"]["bias"] + 5.0
  params["value"]["bias"] = params["value"]["bias"] + 3.0
  bias = layers.attention_mask(key_mask, right_padded=True)
  out = mha.apply({"params": params}, x, kv, bias)
  want = helpers.mha_float64(x.astype(np.float64), kv.astype(np.float64),
                             jax.tree.map(lambda a: np.asarray(a, np.float64), params), key_mask)
  assert _close(out, want, tol)
  square = lambda y: jnp.sum(y.astype(jnp.float32) ** 2)
  grads = jax.grad(lambda p: square(mha.apply({"params": p}, x, kv, bias)))(params)
  written = jax.grad(lambda p: square(plain.apply({"params": p}, x, kv, key_mask)))(params)
  assert not np.any(np.asarray(grads["key"]["bias"]))
  written["key"]["bias"] = jnp.zeros_like(written["key"]["bias"])  # Rounding noise there.
  flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(written)[0]:
    assert rel_err(flat[path], g) <= tol if np.any(g) else not np.any(flat[path]), path


def test_a_structured_mask_reaches_the_kernel_as_lengths(monkeypatch):
  """Right-padded keys (+ causal) go to the fused kernel as key lengths and is_causal, with no
  dense mask; a mask with holes goes densely. The reference path reads the bias either way."""
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, **kwargs):
    seen.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  x = np.random.default_rng(0).normal(size=(3, 13, 32)).astype(np.float32)
  # cuDNN takes 16-bit inputs only (float32 is refused before the kernel is called).
  mha = layers.MultiHeadAttention(
      4, jnp.bfloat16 if FUSED.attention == "cudnn" else jnp.float32, FUSED)
  params = mha.init(jax.random.PRNGKey(0), x)["params"]
  mask = layers.attention_mask(_mask([13, 9, 4], 13), causal_len=13, right_padded=True)
  assert mask.structured and mask.causal and mask.kv_lengths.tolist() == [13, 9, 4]
  mha.apply({"params": params}, x, bias=mask)
  call = seen.pop()
  assert call.get("mask") is None and call["is_causal"]
  assert np.asarray(call["key_value_seq_lengths"]).tolist() == [13, 9, 4]
  holes = np.array([[1, 0, 1] + [1] * 10] * 3, np.int32)
  dense = layers.attention_mask(holes)
  assert not dense.structured
  mha.apply({"params": params}, x, bias=dense)
  call = seen.pop()
  assert call["mask"].shape == (3, 1, 16, 16) and not call.get("is_causal")
  assert layers.attention_mask() is None


def test_auto_picks_the_fused_kernel_only_on_gpu_in_16_bit():
  auto = layers.Compute(attention="auto")
  on_gpu = jax.default_backend() == "gpu"
  assert auto.kernel(jnp.float32) == "reference"
  assert auto.kernel(jnp.bfloat16) == ("cudnn" if on_gpu else "reference")
  assert FUSED.kernel(jnp.float32) == FUSED.attention


@pytest.mark.parametrize("head_dim,pad_to,capability,fused", [
    (64, 16, "9.0", True), (256, 16, "9.0", True), (256, 16, "8.0", False),
    (128, 16, "8.6", True), (12, 16, "9.0", False), (264, 16, "10.0", False),
    (64, 15, "9.0", False)])
def test_auto_keeps_the_reference_where_cudnn_would_refuse(monkeypatch, head_dim, pad_to,
                                                           capability, fused):
  """On a GPU (faked: the backend's name and the device's compute capability), "auto" picks
  cuDNN only for the head dims and pad_to its flash kernel takes (jax's
  check_is_flash_attention: a multiple of 8, <= 256 from Hopper and <= 128 before; even
  token counts for a dense mask in training), and a layer of an unsupported head dim runs."""
  device = type("Device", (), {"compute_capability": capability})()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [device])
  auto = layers.Compute(attention="auto", pad_to=pad_to)
  assert auto.kernel(jnp.bfloat16, head_dim) == ("cudnn" if fused else "reference")
  assert auto.kernel(jnp.float32, head_dim) == "reference"
  if head_dim == 12:  # Width 24, 2 heads: the call goes through the reference einsums.
    called = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: called.append(1))
    x = np.random.default_rng(0).normal(size=(2, 5, 24)).astype(np.float32)
    mha = layers.MultiHeadAttention(2, jnp.bfloat16, auto)
    out = mha.apply(mha.init(jax.random.PRNGKey(0), x), x)
    assert out.shape == x.shape and not called


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention="flash"), "unknown attention"), (dict(remat="some"), "unknown remat"),
    (dict(pad_to=0), "pad_to")])
def test_bad_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    layers.Compute(**kwargs)


def _stacks():
  """name -> (module factory taking a Compute, inputs)."""
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 90, (3, 12)).astype(np.int32)
  mask = _mask([12, 7, 3], 12)
  context = rng.normal(size=(3, 9, 32)).astype(np.float32)
  context_mask = np.concatenate([_mask([4, 2, 3], 4), np.ones((3, 5), np.int32)], axis=1)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  return {
      "vit": (lambda c: VisionTransformer(image_size=32, patch_size=8, width=32, depth=3,
                                          num_heads=4, mlp_dim=64, compute=c), (images,)),
      "clip_text": (lambda c: ClipTextTransformer(vocab_size=100, context_length=16, width=32,
                                                  depth=2, num_heads=4, mlp_dim=64,
                                                  eos_token_id=None, compute=c), (ids, mask)),
      "bert decoder": (lambda c: BertEncoder(vocab_size=100, max_positions=16, width=32,
                                             depth=4, num_heads=4, mlp_dim=64, causal=True,
                                             cross_from=2, lm_head=True, pooler="none",
                                             compute=c),
                       (ids, mask, None, context, context_mask)),
      "fusion": (lambda c: CoAttentionFusion(2, 4, 64, compute=c),
                 (rng.normal(size=(3, 12, 32)).astype(np.float32), mask,
                  rng.normal(size=(3, 17, 32)).astype(np.float32))),
  }


SETTINGS = {  # Each setting is on in at least one of them.
    "scan + remat full": layers.Compute(scan=True, remat="full"),
    "remat dots + fused attention": layers.Compute(attention="xla", remat="dots"),
}


def _loss_and_grad(inputs):
  """Jitted (module, params) -> ((loss, outputs), grads) of a stack on `inputs`: the loss
  is a sum of sines of every float output."""
  def loss(module, params):
    out = module.apply({"params": params}, *inputs)
    values = [v for v in jax.tree.leaves(out) if v.dtype != jnp.int32]
    return sum(jnp.sum(jnp.sin(v.astype(jnp.float32))) for v in values), out

  return jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)


@pytest.mark.parametrize("stack", ["vit", "clip_text", "bert decoder", "fusion"])
def test_stack_settings_match_the_plain_stack(stack):
  make, inputs = _stacks()[stack]
  params = make(REFERENCE).init(jax.random.PRNGKey(0), *inputs)["params"]
  grad = _loss_and_grad(inputs)
  (l_plain, out_plain), g_plain = grad(make(REFERENCE), params)
  for name, setting in SETTINGS.items():
    fast = make(setting)
    # The parameter tree does not depend on the setting (checkpoints are interchangeable).
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, fast.init(jax.random.PRNGKey(0), *inputs)["params"])
    (l_fast, out_fast), g_fast = grad(fast, params)
    for key in out_plain:
      assert max_diff(out_fast[key], out_plain[key]) <= F32_TOL, (name, key)
    assert abs(float(l_fast) - float(l_plain)) <= F32_TOL * (1 + abs(float(l_plain))), name
    _assert_grads_close(g_fast, g_plain, F32_TOL, name)


@pytest.mark.parametrize("stack", ["vit", "clip_text", "bert decoder", "fusion"])
def test_scanned_stacks_run_in_bfloat16_on_float32_inputs(stack):
  """bf16 compute on float32 inputs (the paper-size configs; the fusion's inputs are the
  float32 projections of the towers' tokens): the first layer turns the carry into bf16,
  which a scan's carry may not do. Scanned and remat'ed stacks match the plain one to bf16
  rounding, values and gradients."""
  make, inputs = _stacks()[stack]
  make16 = lambda c: make(c).clone(dtype=jnp.bfloat16)
  params = make16(REFERENCE).init(jax.random.PRNGKey(0), *inputs)["params"]
  grad = _loss_and_grad(inputs)
  (_, out_plain), g_plain = grad(make16(REFERENCE), params)
  (_, out_fast), g_fast = grad(make16(SETTINGS["scan + remat full"]), params)
  for key in out_plain:
    assert out_fast[key].dtype == out_plain[key].dtype, key
    assert _close(out_fast[key], out_plain[key], BF16_TOL), key
  # Relative to each gradient's norm; attention key biases get none (exactly zero).
  flat_fast = dict(jax.tree_util.tree_flatten_with_path(g_fast)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(g_plain)[0]:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      assert not np.any(np.asarray(g)) and not np.any(np.asarray(flat_fast[path])), name
    else:
      assert rel_err(flat_fast[path], g) <= BF16_TOL, name


def test_scan_traces_one_layer_and_remat_marks_the_layers():
  make, inputs = _stacks()["vit"]
  params = make(REFERENCE).init(jax.random.PRNGKey(0), *inputs)["params"]

  def jaxpr(compute):
    return jax.make_jaxpr(jax.grad(lambda p: jnp.sum(
        make(compute).apply({"params": p}, *inputs)["pooled"])))(params)

  plain, scanned, remat = (str(jaxpr(c)) for c in (
      REFERENCE, layers.Compute(scan=True), layers.Compute(remat="full")))
  assert "scan" not in plain and "scan[" in scanned
  # Three layers unrolled vs one scanned body: the program is much shorter.
  assert len(scanned) < 0.6 * len(plain)
  assert "checkpoint" in remat or "remat" in remat


def test_remat_dots_keeps_the_fused_attention_kernels_outputs():
  """cuDNN's attention is a custom_vjp whose forward rule binds one primitive
  (`dot_product_attention_fwd_wrapper`) and whose backward reads its outputs. remat="dots"
  keeps them, so the backward pass does not run the forward kernel again; "full" does run it
  again. The kernel is a GPU's, so a primitive of that name stands in for it here, bound the
  same way; JAX's own is checked to carry the name."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  from jax.extend.core import Primitive
  from jax.interpreters import mlir

  assert cudnn_attention._dot_product_attention_fwd_p_wrapper.name in \
      layers.FUSED_ATTENTION_FORWARD
  fwd_p = Primitive(layers.FUSED_ATTENTION_FORWARD[0])
  fwd_p.multiple_results = True
  kernel = lambda q: [jnp.tanh(q) * 2.0, jnp.sum(q, -1)]  # (output, statistics)
  fwd_p.def_impl(kernel)
  fwd_p.def_abstract_eval(lambda q: [jax.core.ShapedArray(q.shape, q.dtype),
                                     jax.core.ShapedArray(q.shape[:-1], q.dtype)])
  mlir.register_lowering(fwd_p, mlir.lower_fun(kernel, multiple_results=True))

  @jax.custom_vjp
  def attend(q):
    return fwd_p.bind(q)[0]

  def attend_fwd(q):
    out, stats = fwd_p.bind(q)
    return out, (q, out, stats)

  def attend_bwd(res, g):
    q, out, stats = res  # d(2 tanh q)/dq = 2 - out^2 / 2; the statistics read, as cuDNN's are.
    return (g * (2.0 - out ** 2 / 2.0) + 0.0 * stats[..., None],)

  attend.defvjp(attend_fwd, attend_bwd)
  w = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)

  def layer(q):
    return jnp.sin(attend(q @ w)) @ w

  q = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
  runs = {}
  for remat in ("dots", "full"):
    step = jax.checkpoint(layer, policy=layers.REMAT_POLICIES[remat])
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(step(q))))(q)
    runs[remat] = str(jaxpr).count(layers.FUSED_ATTENTION_FORWARD[0])
    np.testing.assert_allclose(jax.grad(lambda q: jnp.sum(step(q)))(q),
                               jax.grad(lambda q: jnp.sum(layer(q)))(q), rtol=1e-6)
  assert runs == {"dots": 1, "full": 2}


def test_amif_losses_and_gradients_do_not_depend_on_compute():
  config = helpers.tiny_config()
  model, params = amif.create(config)
  config.model.compute.update(attention="xla", scan=True, remat="dots")
  fast, _ = amif.create(config, abstract=True)
  assert fast.image.compute.scan and fast.decoder.compute.remat == "dots"
  rng = np.random.default_rng(0)
  q, a, p = 30, 8, 64
  batch = dict(
      images=rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
      input_ids=rng.integers(1000, 5000, (4, q)).astype(np.int32),
      attention_mask=_mask([30, 12, 5, 20], q),
      prior_ids=rng.integers(1000, 5000, p).astype(np.int32), prior_mask=_mask([40], p)[0],
      answer_ids=rng.integers(1000, 5000, (4, a)).astype(np.int32),
      answer_mask=_mask([8, 3, 5, 2], a))

  def loss(module, params):
    return module.apply({"params": params}, **batch, method=amif.AMiF.vqa)["loss"]

  l_ref, g_ref = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(model, params)
  l_fast, g_fast = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(fast, params)
  assert abs(float(l_fast) - float(l_ref)) <= F32_TOL * (1 + abs(float(l_ref)))
  _assert_grads_close(g_fast, g_ref, F32_TOL)


@pytest.mark.parametrize("compute,dtype,tol", [(REFERENCE, jnp.float32, F32_TOL),
                                               (FUSED, jnp.float32, F32_TOL),
                                               (FUSED, jnp.bfloat16, BF16_TOL),
                                               (SETTINGS["scan + remat full"], jnp.float32,
                                                F32_TOL)],
                         ids=["reference", "fused", "fused bf16", "scan + remat"])
def test_packed_rows_read_each_sequence_as_if_alone(compute, dtype, tol):
  """Sequences packed one after another in a row (`segment_ids`: a question's candidate
  answers when ranking) give each the decoder tokens and logits it gets alone in a padded row
  of its own: positions restart at each sequence, attention stays within it, and its row's
  context is its own. A packed row may be longer than the positions the model has."""
  if compute.attention == "cudnn" and dtype == jnp.float32:
    pytest.skip("cuDNN's fused attention takes 16-bit inputs only")
  rng = np.random.default_rng(5)
  lengths, row = [[5, 3, 6], [4, 7]], 16  # Row 0: 14 tokens + 2 padding; row 1: 11 + 5.
  seqs = [[rng.integers(5, 90, n) for n in row_lengths] for row_lengths in lengths]
  context = rng.normal(size=(2, 9, 24)).astype(np.float32)
  context_mask = np.array([[1] * 9, [1, 1, 0, 1, 1, 1, 0, 1, 1]], np.int32)  # With holes.
  packed = np.zeros((2, row), np.int32)
  segments = np.zeros((2, row), np.int32)
  for r, row_seqs in enumerate(seqs):
    packed[r, :sum(lengths[r])] = np.concatenate(row_seqs)
    segments[r] = np.repeat(np.arange(len(row_seqs) + 1), lengths[r] + [row - sum(lengths[r])])
  alone = np.zeros((5, 7), np.int32)
  for i, s in enumerate(s for row_seqs in seqs for s in row_seqs):
    alone[i, :len(s)] = s
  alone_mask = _mask([n for row_lengths in lengths for n in row_lengths], 7)
  owner = [0, 0, 0, 1, 1]
  decoder = BertEncoder(vocab_size=100, max_positions=8, width=32, depth=2, num_heads=4,
                        mlp_dim=64, causal=True, cross_from=1, context_width=24, lm_head=True,
                        pooler="none", dtype=dtype, compute=compute)
  params = decoder.init(jax.random.PRNGKey(0), alone, alone_mask, None, context[owner],
                        context_mask[owner])["params"]
  run = jax.jit(lambda *a, **kw: decoder.apply({"params": params}, *a, **kw))
  ref = run(alone, alone_mask, None, context[owner], context_mask[owner])
  out = run(packed, None, None, context, context_mask, segment_ids=segments)
  i = 0
  for r, row_lengths in enumerate(lengths):
    start = 0
    for n in row_lengths:
      for key in ("tokens", "logits"):
        assert _close(out[key][r, start:start + n], ref[key][i, :n], tol), (key, r, start)
      start, i = start + n, i + 1


def test_reference_attention_weights_are_float32_in_a_bf16_model():
  """In bfloat16 the reference path makes its logits in float32 (the einsum accumulates
  there), so the weights it returns are float32 and equal, to float32 rounding, the float64
  softmax(q k^T / sqrt(d)) of the bf16 q and k (identity query and key projections, biases
  zero, inputs exact in bf16); bf16 logits would be off by ~1e-2 of the larger logits."""
  rng = np.random.default_rng(7)
  x = np.asarray(jnp.asarray(rng.normal(size=(2, 6, 32)) * 2, jnp.bfloat16), np.float32)
  kv = np.asarray(jnp.asarray(rng.normal(size=(2, 9, 32)) * 2, jnp.bfloat16), np.float32)
  mha = layers.MultiHeadAttention(4, jnp.bfloat16, REFERENCE)
  params = mha.init(jax.random.PRNGKey(0), x, kv)["params"]
  eye = np.eye(32, dtype=np.float32).reshape(32, 4, 8)
  for name in ("query", "key"):
    params[name] = {"kernel": eye, "bias": np.zeros((4, 8), np.float32)}
  _, weights = mha.apply({"params": params}, x, kv, return_weights=True)
  assert weights.dtype == jnp.float32 and weights.shape == (2, 4, 6, 9)
  q = x.astype(np.float64).reshape(2, 6, 4, 8)
  k = kv.astype(np.float64).reshape(2, 9, 4, 8)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  assert np.abs(logits).max() > 8  # Large enough for bf16 rounding to show.
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(weights, np.float64), want, rtol=0, atol=1e-5)


def test_remat_dots_saves_the_matmuls_that_full_recomputes(capsys):
  """remat="dots" keeps a stack's weight matmuls' outputs for the backward pass; "full" keeps
  each layer's input only: the saved residuals differ, dots saving more."""
  from jax.ad_checkpoint import print_saved_residuals
  make, inputs = _stacks()["vit"]
  params = make(REFERENCE).init(jax.random.PRNGKey(0), *inputs)["params"]
  saved = {}
  for remat in ("full", "dots"):
    module = make(layers.Compute(remat=remat))
    print_saved_residuals(lambda p: module.apply({"params": p}, *inputs)["pooled"], params)
    saved[remat] = [line for line in capsys.readouterr().out.splitlines()
                    if "from the argument" not in line]
  products = {k: [line for line in v if "output of dot_general" in line]
              for k, v in saved.items()}
  assert products["full"] == []
  # Each of the 3 layers' q, k, v and out projections (3 x 17 tokens x 32) and its fc1
  # (51 tokens x 64, the MLP runs on a matrix).
  assert sum(line.startswith("f32[3,17,32]") for line in products["dots"]) == 12
  assert sum(line.startswith("f32[51,64]") for line in products["dots"]) == 3
