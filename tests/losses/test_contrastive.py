"""Soft-label and hard-label contrastive losses against NumPy transcriptions."""

import numpy as np
import pytest

import helpers

from medvqa_jax.losses import contrastive


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_soft_label(a, b, ta, tb, s, tau, lam):
  """KL(softmax(s*T + lam*I) || softmax(S/tau)), rows averaged, one direction."""
  target = _log_softmax(s * ta @ tb.T + lam * np.eye(len(a)))
  student = _log_softmax(a @ b.T / tau)
  return np.mean(np.sum(np.exp(target) * (target - student), -1))


@pytest.fixture
def emb():
  rng = np.random.default_rng(0)
  n = 12
  return dict(image=_unit(rng, n, 16), image2=_unit(rng, n, 16), text=_unit(rng, n, 16),
              t_image=_unit(rng, n, 8), t_image2=_unit(rng, n, 8), t_text=_unit(rng, n, 8))


def test_soft_label_losses_match_numpy(emb):
  s, lam = 85.0, 0.01
  taus = {"itgc": 0.07, "imvc": 0.05, "utgc": 0.1}
  teacher = {"image": emb["t_image"], "image2": emb["t_image2"], "text": emb["t_text"],
             "scale": s}
  student = {k: emb[k] for k in ("image", "image2", "text")}
  out = contrastive.global_losses(student, teacher, taus, lam)
  e = emb
  itgc = 0.5 * (np_soft_label(e["image"], e["text"], e["t_image"], e["t_text"], s, 0.07, lam)
                + np_soft_label(e["text"], e["image"], e["t_text"], e["t_image"], s, 0.07, lam))
  imvc = 0.5 * (np_soft_label(e["image"], e["image2"], e["t_image"], e["t_image2"], s, 0.05, lam)
                + np_soft_label(e["image2"], e["image"], e["t_image2"], e["t_image"], s, 0.05,
                                lam))
  utgc = np_soft_label(e["text"], e["text"], e["t_text"], e["t_text"], s, 0.1, lam)
  np.testing.assert_allclose(out["itgc"], itgc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["imvc"], imvc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["utgc"], utgc, rtol=1e-5, atol=1e-5)
  assert itgc > 0.1  # A non-trivial value, not a vanishing one.


def test_large_lambda_gives_hard_label_infonce(emb):
  soft = contrastive.soft_label_loss(emb["image"], emb["text"], emb["t_image"], emb["t_text"],
                                     85.0, 0.07, lam=1e5)
  hard = contrastive.info_nce(emb["image"], emb["text"], 0.07)
  logp = _log_softmax(emb["image"] @ emb["text"].T / 0.07)
  logp_t = _log_softmax(emb["text"] @ emb["image"].T / 0.07)
  expected = -0.5 * (np.mean(np.diag(logp)) + np.mean(np.diag(logp_t)))
  np.testing.assert_allclose(hard, expected, rtol=1e-5)
  np.testing.assert_allclose(soft, hard, rtol=1e-5)
  small = contrastive.soft_label_loss(emb["image"], emb["text"], emb["t_image"], emb["t_text"],
                                      85.0, 0.07, lam=0.01)
  assert abs(float(small) - float(hard)) > 0.1  # The teacher does shape the target.


def test_label_smoothing(emb):
  eps, tau = 0.1, 0.07
  n = len(emb["image"])
  target = (1 - eps) * np.eye(n) + eps / n
  logp = _log_softmax(emb["image"] @ emb["text"].T / tau)
  logp_t = _log_softmax(emb["text"] @ emb["image"].T / tau)
  expected = -0.5 * (np.mean(np.sum(target * logp, -1)) + np.mean(np.sum(target * logp_t, -1)))
  got = contrastive.info_nce(emb["image"], emb["text"], tau, label_smoothing=eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_without_teacher_utgc_is_left_out(emb):
  out = contrastive.global_losses({"image": emb["image"], "text": emb["text"]}, None,
                                  {"itgc": 0.07, "imvc": 0.07, "utgc": 0.07}, 0.01)
  assert set(out) == {"itgc"}


def test_similarities_are_computed_at_full_float32_precision(emb):
  # JAX's default precision rounds float32 products to bfloat16 passes on TPUs and to TF32 on
  # recent GPUs: errors of a few hundredths in teacher logits scaled by ~85, larger than the
  # lambda = 0.01 that tilts the targets. CPUs compute float32 either way, so the test reads
  # the program: every product asks for the highest precision.
  import jax
  from medvqa_jax.losses import itm
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  e = {k: np.float32(v) for k, v in emb.items()}
  for fn in (lambda: contrastive.soft_label_loss(e["image"], e["text"], e["t_image"],
                                                 e["t_text"], 85.0, 0.07),
             lambda: contrastive.info_nce(e["image"], e["text"], 0.07),
             lambda: itm.hard_negative_pairs(jax.random.PRNGKey(0), e["image"], e["text"],
                                             0.07, negative_images=True)):
    precisions = helpers.dot_precisions(fn)
    assert precisions and all(p == highest for p in precisions), precisions


def test_temperatures_start_at_their_initial_value_and_stay_positive():
  import jax

  from medvqa_jax.models.amif import Temperatures
  module = Temperatures(0.05)  # Initialised on its own (its field once hid Module.init).
  params = module.init(jax.random.PRNGKey(0))
  assert {k: round(float(v), 6) for k, v in module.apply(params).items()} == {
      "itgc": 0.05, "imvc": 0.05, "utgc": 0.05}
  negative = jax.tree.map(lambda v: v - 10.0, params)  # Log-temperatures far below zero.
  assert all(float(v) > 0 for v in module.apply(negative).values())
