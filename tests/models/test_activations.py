"""The GELUs' hand-written gradients: x Phi(x)'s derivative, Phi(x) + x phi(x), and x
sigmoid(1.702 x)'s, s + 1.702 x s (1 - s), against float64 formulas, and only the input kept
for the backward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from medvqa_jax.models import layers


def _exact(x):
  x = np.asarray(x, np.float64)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _quick(x):
  x = np.asarray(x, np.float64)
  s = 0.5 * (1 + np.tanh(0.851 * x))  # sigmoid(1.702 x), without overflow.
  return x * s, s + 1.702 * x * s * (1 - s)


# (activation, the formula, the plain function autodiff would differentiate)
GELUS = {"gelu": (layers.exact_gelu, _exact, lambda x: jax.nn.gelu(x, approximate=False)),
         "quick_gelu": (layers.quick_gelu, _quick, lambda x: x * jax.nn.sigmoid(1.702 * x))}


# float32: the formula rounded once (values near 1, so an absolute 1e-6 is a few ulps);
# bfloat16: the gradient rounded once to bf16's 8 bits (2^-8 relative, values up to 1.13).
@pytest.mark.parametrize("name", sorted(GELUS))
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 4.5e-3)])
def test_the_gelus_and_their_gradients_match_the_formula(name, dtype, atol):
  fn, formula, plain = GELUS[name]
  x = jnp.asarray(np.concatenate([np.linspace(-10, 10, 4001), [0.0, -0.0, 1e-30, -40, 40]]),
                  dtype)
  value, grad = formula(x)  # At x as rounded to dtype.
  out, vjp = jax.vjp(fn, x)
  (g,) = vjp(jnp.ones_like(out))
  assert out.dtype == g.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain(x)))
  np.testing.assert_allclose(np.asarray(g, np.float64), grad, rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(out, np.float64), value, rtol=1e-2, atol=atol)
  # The cotangent scales the gradient, elementwise.
  cot = jnp.asarray(np.linspace(-3, 3, x.size), dtype)
  (g2,) = vjp(cot)
  np.testing.assert_allclose(np.asarray(g2, np.float64),
                             grad * np.asarray(cot, np.float64), rtol=0, atol=4 * atol)


@pytest.mark.parametrize("name", sorted(GELUS))
def test_an_mlp_keeps_its_hidden_layer_twice_not_more(name, capsys):
  """The backward pass of fc1 -> GELU -> fc2 needs fc1's output (for GELU's gradient) and
  GELU's (for fc2's kernel gradient): two arrays of the hidden layer's size, where autodiff
  keeps more (jax.nn.gelu's erfc, the quick GELU's sigmoid and its product with x)."""
  mlp = layers.Mlp(64, name, jnp.bfloat16)
  x = jnp.ones((2, 5, 16), jnp.bfloat16)
  params = mlp.init(jax.random.key(0), x)
  print_saved_residuals(lambda p, x: mlp.apply(p, x), params, x)
  hidden = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("bf16[2,5,64]")]
  assert len(hidden) == 2, hidden
  # And the gradients of the whole MLP agree with autodiff of the plain function's (float32).
  mlp32 = layers.Mlp(64, name)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  params = mlp32.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(jnp.sin(mlp32.apply(p, x)))
  ours = jax.grad(loss, argnums=(0, 1))(params, x)
  layers.ACTIVATIONS[name], saved = GELUS[name][2], layers.ACTIVATIONS[name]
  try:
    autodiff = jax.grad(loss, argnums=(0, 1))(params, x)
  finally:
    layers.ACTIVATIONS[name] = saved
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ours, autodiff)


def test_gelu_new_is_transformers_tanh_approximation():
  """"gelu_new" (GPT-2's and some BERTs' hidden_act) is transformers' ACT2FN["gelu_new"],
  0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), not the exact GELU it approximates."""
  import torch
  from transformers.activations import ACT2FN
  x = np.linspace(-6, 6, 2401).astype(np.float32)
  want = ACT2FN["gelu_new"](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.activation("gelu_new")(jnp.asarray(x))), want,
                             rtol=0, atol=1e-6)
  x64 = x.astype(np.float64)
  formula = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
  np.testing.assert_allclose(want, formula, rtol=0, atol=1e-6)


def test_each_activation_name_is_transformers_function_of_that_name():
  """The names the checkpoints' configs give (`hidden_act`) pick transformers' function of
  that name: "gelu" the exact one (erf), "gelu_new" the tanh approximation, "quick_gelu"
  x sigmoid(1.702 x). A name mapped to a neighbour passes a tiny random checkpoint's parity
  (its activations stay within +-0.5, where the GELUs differ by 2e-5)."""
  import torch
  from transformers.activations import ACT2FN
  x = np.linspace(-6, 6, 2401, dtype=np.float32)
  for name, fn in layers.ACTIVATIONS.items():
    want = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), want, rtol=0, atol=2e-6,
                               err_msg=name)
