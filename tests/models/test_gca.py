"""The Gated Cross-Attention Module against a NumPy transcription of the paper's formulas."""

import jax
import numpy as np
import pytest

from helpers import max_diff, mha_float64 as mha
from medvqa_jax.models.gca import GatedCrossAttention, answer_prior

D, HEADS, MLP, EPS = 32, 4, 64, 1e-12


# ---- NumPy reference ----------------------------------------------------------------------

def ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def ffn(x, p):
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = np.maximum(h, 0)  # ReLU, as the reference code's GCA.
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def gca_reference(p, x, prior, prior_mask):
  """Y0 = LN(Y + MHA(Y,Y,Y)); Yh = LN(FFN(Y0) + Y0); X' = LN(X + MHA(X, Yh));
  G = sigmoid(W X' + b); Z = G X' + (1 - G) X; out = LN(FFN(Z) + Z). (out, G, X', Yh)"""
  y = np.broadcast_to(prior, (x.shape[0],) + prior.shape)
  m = np.broadcast_to(prior_mask, (x.shape[0],) + prior_mask.shape)
  y0 = ln(y + mha(y, y, p["prior_attn"], m), p["prior_attn_ln"])
  yh = ln(ffn(y0, p["prior_mlp"]) + y0, p["prior_mlp_ln"])
  xp = ln(x + mha(x, yh, p["cross_attn"], m), p["cross_ln"])
  g = 1 / (1 + np.exp(-(xp @ p["gate"]["kernel"] + p["gate"]["bias"])))
  z = g * xp + (1 - g) * x
  return ln(ffn(z, p["mlp"]) + z, p["mlp_ln"]), g, xp, yh


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, D))
  prior = rng.normal(size=(9, D))
  prior_mask = (np.arange(9) < 7).astype(np.int32)
  module = GatedCrossAttention(HEADS, MLP)
  params = module.init(jax.random.PRNGKey(0), x, prior, prior_mask)["params"]
  # Random LayerNorms, so that each one is checked.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.3 * rng.normal(size=v.shape) if "ln" in str(path[0]) else v, params)
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  return module, params, x, prior, prior_mask


def _run(module, params, x, prior, prior_mask):
  as32 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float32), t)
  return module.apply({"params": as32(params)}, *as32((x, prior, prior_mask)),
                      return_weights=True)


def test_gca_matches_formula(setup):
  module, params, x, prior, prior_mask = setup
  out = _run(module, params, x, prior, prior_mask)
  expected, gate, _, encoded = gca_reference(params, x, prior, prior_mask)
  assert max_diff(out["out"], expected) <= 1e-5
  assert max_diff(out["gate"], gate) <= 1e-5
  assert max_diff(out["prior"], encoded) <= 1e-5  # Yh, per example.
  g = np.asarray(out["gate"])
  assert g.min() >= 0 and g.max() <= 1 and g.std() > 0
  w = np.asarray(out["cross_weights"])  # (B, heads, L, P): retrievable, padded prior unused.
  assert w.shape == (2, HEADS, 6, 9) and np.all(w[..., 7:] == 0)


def test_gate_closed_gives_ffn_of_input_and_open_gives_cross_attended_path(setup):
  module, params, x, prior, prior_mask = setup
  closed = {**params, "gate": {**params["gate"], "bias": np.full(D, -1e4)}}
  out = _run(module, closed, x, prior, prior_mask)
  assert float(np.max(out["gate"])) == 0.0
  assert max_diff(out["out"], ln(ffn(x, params["mlp"]) + x, params["mlp_ln"])) <= 1e-5

  opened = {**params, "gate": {**params["gate"], "bias": np.full(D, 1e4)}}
  out = _run(module, opened, x, prior, prior_mask)
  _, _, xp, _ = gca_reference(params, x, prior, prior_mask)
  assert float(np.min(out["gate"])) == 1.0
  assert max_diff(out["out"], ln(ffn(xp, params["mlp"]) + xp, params["mlp_ln"])) <= 1e-5


def test_padded_prior_tokens_change_nothing(setup):
  module, params, x, prior, prior_mask = setup
  a = _run(module, params, x, prior, prior_mask)
  noisy = np.where(prior_mask[:, None] == 1, prior, 100.0)
  b = _run(module, params, x, noisy, prior_mask)
  assert max_diff(a["out"], b["out"]) <= 1e-6 and max_diff(a["gate"], b["gate"]) <= 1e-6


@pytest.mark.parametrize("attention", ["reference", "xla"])
def test_shared_prior_is_encoded_and_projected_once_per_batch(setup, attention):
  """A (P, D) prior gives what the same prior tiled to (B, P, D) gives, with the prior layer
  and the cross-attention's key/value projections computed once, not B times."""
  from medvqa_jax.models.layers import Compute
  _, params, x, prior, prior_mask = setup
  module = GatedCrossAttention(HEADS, MLP, compute=Compute(attention=attention))
  b = 4
  x = np.concatenate([x, x[::-1] * 0.5])
  f32 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float32), t)
  apply = jax.jit(lambda p, x, y, m: module.apply({"params": p}, x, y, m)["out"])
  tiled = (np.broadcast_to(prior, (b,) + prior.shape), np.broadcast_to(prior_mask, (b, 9)))
  shared_out = apply(f32(params), *f32((x, prior, prior_mask)))
  tiled_out = apply(f32(params), *f32((x,) + tiled))
  assert max_diff(shared_out, tiled_out) <= 2e-5
  expected, _, _, _ = gca_reference(params, x, prior, prior_mask)
  assert max_diff(shared_out, expected) <= 1e-5

  # Dense projections of the (1, P, D) prior, not of a (B, P, D) copy: its attention's
  # query/key/value and out projection (its heads' outputs read as (1, P, D)), its MLP's first
  # layer, and the cross-attention's key and value (the attention projections of 16 rows
  # where a fused kernel pads the prior's 9 for itself).
  rows = (9,) if attention == "reference" else (9, 16)
  jaxpr = jax.make_jaxpr(apply)(f32(params), *f32((x, prior, prior_mask)))
  on_prior = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns
              if e.primitive.name == "dot_general" and e.invars[0].aval.ndim == 3
              and e.invars[0].aval.shape[0] == 1 and e.invars[0].aval.shape[1] in rows
              and e.invars[0].aval.shape[2] == D]
  assert len(on_prior) == 7, [e.invars[0].aval.shape for e in on_prior]


class _Tok:
  """A tokenizer stand-in with transformers' call signature: one id per character."""
  pad_token_id = 0

  def __call__(self, text, add_special_tokens=True):
    assert not add_special_tokens
    return {"input_ids": [ord(c) for c in text]}


def test_answer_prior_dedupes_caps_and_pads():
  ids, mask = answer_prior(["yes", "no", "yes", "eye"], _Tok(), max_tokens=8, multiple=3)
  assert ids.tolist() == [ord(c) for c in "yesno"] + [0]  # 5 word pieces, padded to 6.
  assert mask.tolist() == [1, 1, 1, 1, 1, 0]
  ids, mask = answer_prior(["abcdef", "xyz"], _Tok(), max_tokens=4, multiple=3)
  assert ids.tolist() == [ord(c) for c in "abcd"] and mask.all()  # Capped, not padded past.
  ids, _ = answer_prior(["yes"], _Tok(), max_tokens=1024)
  assert ids.shape == (128,)  # The default multiple.
  # No word piece at all: every query of the prior would attend to masked keys only, which
  # the attention kernels answer differently. Refused.
  for empty in ([], ["", ""]):
    with pytest.raises(ValueError, match=rf"the answer prior is empty: the {len(empty)} answers"):
      answer_prior(empty, _Tok(), max_tokens=8)


def test_a_prior_that_drops_word_pieces_says_so(caplog):
  answer_prior(["yes", "no", "yes", "eye"], _Tok(), max_tokens=5, multiple=5)
  assert not caplog.records  # Every word piece fits.
  answer_prior(["yes", "no", "ok", "eye", "on"], _Tok(), max_tokens=5, multiple=5)  # No "k".
  assert "holds 5 of the 6 word pieces of the 5 answers (answers with word pieces left out: 1)" \
      in caplog.text
