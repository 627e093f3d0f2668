"""Hard-negative sampling for image-text matching."""

import jax
import numpy as np

from medvqa_jax.losses import itm


def test_positive_never_drawn_and_frequencies_follow_similarity():
  rng = np.random.default_rng(0)
  n = 6
  sim = rng.uniform(-0.9, 0.9, size=(n, n)).astype(np.float32)  # Negative cosines included.
  draws = jax.vmap(lambda k: itm.sample_negatives(k, sim, 0.2))(
      jax.random.split(jax.random.PRNGKey(0), 20000))
  draws = np.asarray(draws)  # (20000, n)
  for i in range(n):
    counts = np.bincount(draws[:, i], minlength=n)
    assert counts[i] == 0
    order = [j for j in np.argsort(-sim[i]) if j != i]
    freq = counts[order] / counts.sum()
    expected = np.exp(sim[i, order] / 0.2) / np.exp(sim[i, order] / 0.2).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert np.all(np.diff(freq) < 0.02)  # Ranked by similarity, up to sampling noise.


def test_negative_pairs_layout():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(5, 8)).astype(np.float32)
  text = rng.normal(size=(5, 8)).astype(np.float32)
  t_idx, i_idx = itm.hard_negative_pairs(jax.random.PRNGKey(3), image, text, 0.1,
                                         negative_images=True)
  t_idx, i_idx = np.asarray(t_idx), np.asarray(i_idx)
  assert t_idx.shape == i_idx.shape == (10,)
  np.testing.assert_array_equal(i_idx[:5], np.arange(5))  # A negative text per image ...
  np.testing.assert_array_equal(t_idx[5:], np.arange(5))  # ... then a negative image per text.
  assert np.all(t_idx != i_idx)


def test_itm_loss_is_cross_entropy_on_logits():
  pos = np.array([[0.0, 2.0], [1.0, -1.0]], np.float32)
  neg = np.array([[3.0, -3.0]], np.float32)
  loss, m = itm.itm_loss(pos, neg)
  logp = lambda row, c: row[c] - np.log(np.exp(row).sum())
  expected = -(logp(pos[0], 1) + logp(pos[1], 1) + logp(neg[0], 0)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["itm_accuracy"], 2 / 3)
