"""layers.LayerNorm: flax.linen.LayerNorm's parameters and arithmetic, with a backward pass
that keeps only the input and two statistics per row (what a scanned stack stores)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from medvqa_jax.models import layers


@pytest.mark.parametrize("x_dtype, dtype", [(jnp.float32, jnp.float32),
                                            (jnp.bfloat16, jnp.bfloat16),
                                            (jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)])
def test_it_is_flax_layer_norm(x_dtype, dtype):
  """The same parameter tree and bit-equal outputs; gradients equal to float32 rounding (the
  input's gradient, rounded to bf16, within one of its units)."""
  x = (jax.random.normal(jax.random.key(0), (3, 5, 64)) * 3 + 1).astype(x_dtype)
  ours, flax_ln = layers.LayerNorm(epsilon=1e-5, dtype=dtype), nn.LayerNorm(1e-5, dtype=dtype)
  params = flax_ln.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  out, ref = ours.apply(params, x), flax_ln.apply(params, x)
  assert out.dtype == ref.dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))

  def grads(module):
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))
    return jax.grad(loss, argnums=(0, 1))(params, x)
  (g_params, g_x), (r_params, r_x) = grads(ours), grads(flax_ln)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               g_params, r_params)
  ulp = 2.0 ** -7 if x_dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(np.asarray(g_x, np.float32), np.asarray(r_x, np.float32),
                             rtol=ulp, atol=ulp)


@pytest.mark.parametrize("norm", ["ours", "flax"])
def test_a_scanned_stack_keeps_no_float32_copy_of_its_tokens(norm, capsys):
  """Scanned over layers, the backward pass reads what the forward stored for every layer:
  the bf16 tokens and, per row, the mean and the reciprocal deviation; flax's layer norm, as
  autodiff differentiates it, stores float32 arrays of the tokens' size too (x - mean, the
  normalised x), which is what `layers.LayerNorm` avoids."""
  module = layers.LayerNorm(dtype=jnp.bfloat16) if norm == "ours" else \
      nn.LayerNorm(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (4, 7, 32), jnp.bfloat16)
  stacked = jax.vmap(lambda k: module.init(k, x))(jax.random.split(jax.random.key(1), 3))

  def stack(params, x):
    layer = lambda x, p: (x + jnp.tanh(module.apply(p, x)), None)
    return jnp.sum(jax.lax.scan(layer, x, params)[0].astype(jnp.float32))

  print_saved_residuals(stack, stacked, x)
  saved = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
  token_sized_f32 = [s for s in saved if re.fullmatch(r"f32\[3,4,7,32\]", s)]
  if norm == "ours":
    assert not token_sized_f32, saved
    assert saved.count("f32[3,4,7,1]") == 2, saved  # The two statistics.
  else:
    assert token_sized_f32, saved
