"""Word-patch alignment by optimal transport: Sinkhorn plans, gradients, IPOT."""

import jax
import numpy as np
import pytest

import helpers

from medvqa_jax.losses import ot
from medvqa_jax.models import layers


def _tokens(seed=0, b=4, lt=9, li=7, d=16):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(b, lt, d)).astype(np.float32)
  image = rng.normal(size=(b, li, d)).astype(np.float32)
  text_mask = (np.arange(lt)[None] < np.array([[9], [6], [4], [8]])).astype(np.int32)
  return text, image, text_mask


def test_sinkhorn_plan_has_the_marginals_with_padding():
  text, image, text_mask = _tokens()
  text_ok, image_ok = ot.token_masks(text_mask, image.shape[1])
  assert np.asarray(text_ok[1]).tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0]  # No CLS, SEP, pads.
  cost = ot.cosine_cost(text, image)
  a, b = ot.marginal(text_ok), ot.marginal(image_ok)
  plan, converged = ot.sinkhorn_plan(cost, a, b, epsilon=0.05, max_iterations=2000,
                                     threshold=1e-4)
  assert bool(np.all(converged))
  np.testing.assert_allclose(plan.sum(-1), a, atol=1e-3)
  np.testing.assert_allclose(plan.sum(-2), b, atol=1e-3)
  real = np.asarray(text_ok)
  np.testing.assert_allclose(np.asarray(plan.sum(-1))[real], np.repeat(
      1 / real.sum(-1), real.sum(-1)), atol=1e-3)  # Uniform over the real tokens.


def test_gradients_are_finite_with_padding_and_flow_through_the_cost_only():
  text, image, text_mask = _tokens(seed=1)
  loss_fn = lambda t, i: ot.wpa_loss(t, i, text_mask, epsilon=0.1, max_iterations=200)[0]
  gt, gi = jax.grad(loss_fn, argnums=(0, 1))(text, image)
  assert np.all(np.isfinite(gt)) and np.all(np.isfinite(gi))
  assert np.abs(gt).sum() > 0 and np.abs(gi).sum() > 0
  # CLS, SEP and padded text tokens, and the image CLS, take no part: no gradient.
  assert np.all(gt[1, 0] == 0) and np.all(gt[1, 5:] == 0) and np.all(gi[:, 0] == 0)


def test_a_zero_token_leaves_every_gradient_finite():
  """A token of all zeros (here a padded text token and a real image patch) has no direction;
  normalising it used to give NaN gradients (the norm's gradient at 0 is 0/0) that reached
  every parameter, masked token or not."""
  text, image, text_mask = _tokens(seed=7)
  text[1, 7] = 0.0   # Padding (row 1 has 6 real tokens).
  image[2, 3] = 0.0  # A real patch.
  loss_fn = lambda t, i: ot.wpa_loss(t, i, text_mask, epsilon=0.1, max_iterations=200)[0]
  gt, gi = jax.grad(loss_fn, argnums=(0, 1))(text, image)
  assert np.all(np.isfinite(gt)) and np.all(np.isfinite(gi))
  assert np.all(gt[1, 7] == 0)  # Padding takes no part.
  # The unit vectors of the other tokens are x / |x| (float32), the zero one stays zero.
  unit = np.asarray(layers.l2_normalize(image))
  np.testing.assert_allclose(unit[0], image[0] / np.linalg.norm(image[0], axis=-1,
                                                                 keepdims=True), rtol=1e-6)
  assert np.all(unit[2, 3] == 0)


def test_identical_tokens_cost_less_than_unrelated_ones():
  rng = np.random.default_rng(2)
  shared = rng.normal(size=(2, 8, 16)).astype(np.float32)
  text = shared
  image = np.concatenate([rng.normal(size=(2, 1, 16)), shared[:, 1:7]], axis=1).astype(np.float32)
  # Text: CLS + 6 tokens + SEP; image: CLS + the same 6 tokens, shuffled.
  image = image[:, [0, 3, 1, 6, 2, 5, 4]]
  mask = np.ones((2, 8), np.int32)
  same, _ = ot.wpa_loss(text, image, mask, epsilon=0.01, max_iterations=2000)
  unrelated, _ = ot.wpa_loss(text, rng.normal(size=image.shape).astype(np.float32), mask,
                             epsilon=0.01, max_iterations=2000)
  assert float(same) < 0.05 < float(unrelated)


def test_ipot_agrees_with_sinkhorn_at_low_epsilon():
  """IPOT converges to unregularised OT; so does Sinkhorn as epsilon -> 0. Their costs agree
  within 2e-2 (costs lie in [0, 2]) at epsilon 0.005."""
  text, image, text_mask = _tokens(seed=3)
  sinkhorn, metrics = ot.wpa_loss(text, image, text_mask, solver="sinkhorn", epsilon=0.005,
                                  max_iterations=5000, threshold=1e-4)
  ipot, _ = ot.wpa_loss(text, image, text_mask, solver="ipot", ipot_beta=0.5,
                        ipot_iterations=200)
  assert float(metrics["wpa_converged"]) == 1.0
  assert abs(float(sinkhorn) - float(ipot)) < 2e-2
  # IPOT's plan has the same marginals over the real tokens.
  text_ok, image_ok = ot.token_masks(text_mask, image.shape[1])
  plan = ot.ipot_plan(ot.cosine_cost(text, image), text_ok, image_ok, 0.5, 50)
  np.testing.assert_allclose(plan.sum((1, 2)), 1.0, atol=1e-3)
  np.testing.assert_allclose(plan.sum(-2)[:, 1:], 1 / 6, atol=1e-3)


def _ipot_reference(cost, beta=0.5, iterations=50):
  """The reference's IPOT loop on one pair's real tokens (cost: text x image), in NumPy and
  float64: its plan is image x text, its image scaling is updated before its text scaling."""
  n_text, n_image = cost.shape
  kernel, plan = np.exp(-cost.T / beta), np.ones((n_image, n_text))
  text_scale = np.full(n_text, 1 / n_text)
  for _ in range(iterations):
    q = kernel * plan
    image_scale = 1 / (n_image * (q @ text_scale))
    text_scale = 1 / (n_text * (image_scale @ q))
    plan = image_scale[:, None] * q * text_scale[None]
  return plan.T


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_ipot_plan_follows_the_reference_loop_with_padding(beta):
  text, image, text_mask = _tokens(seed=5)
  text_ok, image_ok = ot.token_masks(text_mask, image.shape[1])
  cost = np.asarray(ot.cosine_cost(text, image))
  plan = np.asarray(ot.ipot_plan(cost, text_ok, image_ok, beta, 50))
  for b in range(len(text)):
    rows, cols = np.flatnonzero(text_ok[b]), np.flatnonzero(image_ok[b])
    want = _ipot_reference(cost[b][np.ix_(rows, cols)].astype(np.float64), beta)
    np.testing.assert_allclose(plan[b][np.ix_(rows, cols)], want, rtol=1e-4, atol=1e-7)
    real = np.outer(text_ok[b], image_ok[b]).astype(bool)
    assert np.all(plan[b][~real] == 0) and (~real).any()  # No mass on a pad, CLS or SEP.
    # The text scaling comes last: the text marginal is met exactly.
    np.testing.assert_allclose(plan[b].sum(-1)[rows], 1 / len(rows), rtol=1e-5)


def test_convergence_rate_is_reported():
  text, image, text_mask = _tokens(seed=4)
  _, fast = ot.wpa_loss(text, image, text_mask, epsilon=1.0, max_iterations=100)
  _, starved = ot.wpa_loss(text, image, text_mask, epsilon=0.001, max_iterations=5,
                           threshold=1e-6)
  assert float(fast["wpa_converged"]) == 1.0 and float(starved["wpa_converged"]) < 1.0


def test_a_fixed_iteration_budget_runs_a_scan_and_gives_the_converged_loss():
  """min_iterations == max_iterations: OTT runs the Sinkhorn loop as a lax.scan (no
  convergence test per iteration, a fixed cost); once the budget suffices, the loss is the
  one of the loop that stops at the threshold."""
  text, image, text_mask = _tokens(seed=5)
  loss = lambda **kw: ot.wpa_loss(text, image, text_mask, epsilon=0.1, threshold=1e-5, **kw)
  adaptive, m_adaptive = loss(max_iterations=1000)
  fixed, m_fixed = loss(min_iterations=300, max_iterations=300)
  assert float(m_adaptive["wpa_converged"]) == 1.0 and float(m_fixed["wpa_converged"]) == 1.0
  assert abs(float(fixed) - float(adaptive)) <= 1e-5 * abs(float(adaptive))
  jaxpr = lambda **kw: str(jax.make_jaxpr(lambda t: ot.wpa_loss(
      t, image, text_mask, epsilon=0.1, **kw)[0])(text))
  assert "while[" not in jaxpr(min_iterations=50, max_iterations=50)
  assert "while[" in jaxpr(max_iterations=50)


def _np_sinkhorn(cost, a, b, epsilon, iterations):
  """`iterations` log-domain Sinkhorn updates from zero potentials, OTT's order (the column
  potential g, then the row potential f), in float64: the plan exp((f + g - C) / eps)."""
  lse = lambda x, axis: np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis)) + x.max(axis)
  f, g = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])
  for _ in range(iterations):
    g = epsilon * np.log(b) - epsilon * lse((f[:, None] - cost) / epsilon, 0)
    f = epsilon * np.log(a) - epsilon * lse((g[None] - cost) / epsilon, 1)
  return np.exp((f[:, None] + g[None] - cost) / epsilon)


def test_an_iteration_budget_runs_exactly_that_many_iterations():
  """OTT iterates in chunks of 10 with a convergence test after each: a fixed budget of 7 ran
  no iteration at all (and was reported converged), one of 25 ran 20 (also reported
  converged, its last error never measured), and a loop capped at 5 ran 10."""
  text, image, text_mask = _tokens(seed=6)
  text_ok, image_ok = ot.token_masks(text_mask, image.shape[1])
  cost = ot.cosine_cost(text, image)
  a, b = ot.marginal(text_ok), ot.marginal(image_ok)
  eps = 0.02  # Slow to converge: every iteration changes the plan.
  for lo, hi in ((7, 7), (25, 25), (0, 5), (0, 13)):
    plan, converged = ot.sinkhorn_plan(cost, a, b, epsilon=eps, max_iterations=hi,
                                       threshold=1e-6, min_iterations=lo)
    for k in range(len(a)):
      want = _np_sinkhorn(np.asarray(cost[k], np.float64), np.asarray(a[k], np.float64),
                          np.asarray(b[k], np.float64), eps, hi)
      np.testing.assert_allclose(plan[k], want, rtol=2e-3, atol=1e-7, err_msg=f"{lo, hi}")
      # One iteration fewer or more is a different plan at this epsilon.
      for other in (hi - 1, hi + 1):
        fewer = _np_sinkhorn(np.asarray(cost[k], np.float64), np.asarray(a[k], np.float64),
                             np.asarray(b[k], np.float64), eps, other)
        assert np.abs(fewer - want).max() > 10 * np.abs(np.asarray(plan[k]) - want).max()
    assert not np.asarray(converged).any(), (lo, hi)  # Far from the threshold: measured.
  with pytest.raises(ValueError, match="min_iterations=8, max_iterations=5"):
    ot.sinkhorn_plan(cost, a, b, epsilon=eps, max_iterations=5, threshold=1e-6,
                     min_iterations=8)


def _np_cosine_cost(text, image):
  """1 - cos(text token, image token) per pair, in NumPy and float64."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return 1.0 - np.einsum("btd,bid->bti", unit(text.astype(np.float64)),
                         unit(image.astype(np.float64)))


def test_loss_is_the_mean_over_pairs_of_the_transport_cost():
  """The loss is the mean over the batch's pairs of sum(C * P) over the real token pairs,
  with C the cosine cost (NumPy) and P the plan of the module's solver for the masks'
  marginals: not their sum, and no pad, CLS or SEP entry counted."""
  text, image, text_mask = _tokens(seed=6)
  text_ok, image_ok = (np.asarray(m) for m in ot.token_masks(text_mask, image.shape[1]))
  cost = _np_cosine_cost(text, image)
  real = (text_ok[:, :, None] & image_ok[:, None, :]).astype(np.float64)
  kw = dict(epsilon=0.1, max_iterations=500, threshold=1e-5)
  plan, _ = ot.sinkhorn_plan(ot.cosine_cost(text, image), ot.marginal(text_ok),
                             ot.marginal(image_ok), **kw)
  per_pair = np.sum(cost * np.asarray(plan, np.float64) * real, axis=(1, 2))
  loss, _ = ot.wpa_loss(text, image, text_mask, solver="sinkhorn", **kw)
  np.testing.assert_allclose(loss, per_pair.mean(), rtol=1e-5)
  assert np.ptp(per_pair) > 0.01 and per_pair.mean() > 0.5  # Pairs differ; a real cost.
  # IPOT at a beta other than its default (a beta the loss ignored gave 0.5's).
  plan = ot.ipot_plan(ot.cosine_cost(text, image), text_ok, image_ok, 0.05, 30)
  per_pair = np.sum(cost * np.asarray(plan, np.float64) * real, axis=(1, 2))
  loss, _ = ot.wpa_loss(text, image, text_mask, solver="ipot", ipot_beta=0.05,
                        ipot_iterations=30)
  np.testing.assert_allclose(loss, per_pair.mean(), rtol=1e-5)
  default, _ = ot.wpa_loss(text, image, text_mask, solver="ipot", ipot_iterations=30)
  assert abs(float(default) - float(loss)) > 1e-4


def test_captions_without_a_real_token_are_left_out_of_the_mean():
  """Pair 2's caption is CLS and SEP only: it has nothing to align, and the loss is the mean
  over the other three pairs (it once counted as a zero, lowering the loss by a quarter)."""
  text, image, text_mask = _tokens(seed=6)
  text_mask[2] = np.arange(text_mask.shape[1]) < 2
  kw = dict(epsilon=0.1, max_iterations=500, threshold=1e-5)
  text_ok, image_ok = (np.asarray(m) for m in ot.token_masks(text_mask, image.shape[1]))
  assert not text_ok[2].any() and text_ok[[0, 1, 3]].any(-1).all()
  loss, _ = ot.wpa_loss(text, image, text_mask, **kw)
  kept = [0, 1, 3]
  alone, _ = ot.wpa_loss(text[kept], image[kept], text_mask[kept], **kw)
  np.testing.assert_allclose(loss, alone, rtol=1e-5)
  assert float(alone) > 0.5
  # None with a real token: 0, not NaN.
  empty, _ = ot.wpa_loss(text, image, np.broadcast_to(text_mask[2], text_mask.shape), **kw)
  assert float(empty) == 0.0


def test_the_cost_and_ipot_products_are_computed_at_full_float32_precision():
  # As the contrastive similarities (test_contrastive): on CPU float32 is exact either way,
  # so the test reads the program.
  text, image, text_mask = _tokens(seed=5)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for solver in ("sinkhorn", "ipot"):
    precisions = helpers.dot_precisions(
        lambda t, i: ot.wpa_loss(t, i, text_mask, solver=solver)[0], text, image)
    assert precisions and all(p == highest for p in precisions), (solver, precisions)
