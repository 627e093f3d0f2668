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
  segments = itm.hard_negative_pairs(jax.random.PRNGKey(3), image, text, 0.1,
                                     negative_images=True)
  # A negative text for each image, then a negative image for each text: the side that is the
  # batch itself is None (the model gathers nothing for it).
  assert [(t is None, i is None) for t, i in segments] == [(False, True), (True, False)]
  assert [(t is None, i is None) for t, i in itm.hard_negative_pairs(
      jax.random.PRNGKey(3), image, text, 0.1)] == [(False, True)]
  t_idx, i_idx = map(np.asarray, itm.pair_indices(segments, 5))
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


def _softmax_without_diagonal(logits, i):
  p = np.exp(logits - logits.max())
  p[i] = 0
  return p / p.sum()


def test_negative_images_follow_the_texts_similarity_to_every_image():
  """For text j the negative image i != j is drawn with p ∝ exp(sim[i, j] / tau): column j of
  the image x text similarity (row j of sim.T), not row j. The negative texts for image i
  follow row i. The embeddings make sim clearly asymmetric, so the two differ."""
  rng = np.random.default_rng(2)
  n, tau, draws = 6, 0.2, 20000
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  image, text = unit(rng.normal(size=(n, 8))), unit(rng.normal(size=(n, 8)))
  sim = image.astype(np.float64) @ text.T.astype(np.float64)
  rows = np.stack([_softmax_without_diagonal(sim[i] / tau, i) for i in range(n)])
  cols = np.stack([_softmax_without_diagonal(sim[:, j] / tau, j) for j in range(n)])
  assert np.abs(rows - cols).max() > 0.2  # Row and column sampling are told apart.
  t_idx, i_idx = jax.vmap(lambda k: itm.pair_indices(
      itm.hard_negative_pairs(k, image, text, tau, True), n))(
      jax.random.split(jax.random.PRNGKey(5), draws))
  t_idx, i_idx = np.asarray(t_idx), np.asarray(i_idx)  # (draws, 2n)
  np.testing.assert_array_equal(i_idx[:, :n], np.broadcast_to(np.arange(n), (draws, n)))
  np.testing.assert_array_equal(t_idx[:, n:], np.broadcast_to(np.arange(n), (draws, n)))
  for i in range(n):  # Negative texts of image i (row i).
    freq = np.bincount(t_idx[:, i], minlength=n) / draws
    np.testing.assert_allclose(freq, rows[i], atol=0.015, err_msg=f"image {i}")
  for j in range(n):  # Negative images of text j (column j).
    freq = np.bincount(i_idx[:, n + j], minlength=n) / draws
    np.testing.assert_allclose(freq, cols[j], atol=0.015, err_msg=f"text {j}")


def test_caption_keys_tell_captions_apart_by_their_real_tokens():
  ids = np.array([[101, 7, 8, 102, 0], [101, 7, 8, 102, 0], [101, 8, 7, 102, 0],
                  [101, 7, 8, 102, 9], [101, 7, 8, 0, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0],
                   [1, 1, 1, 0, 0]], np.int32)
  keys = np.asarray(jax.jit(itm.caption_keys)(ids, mask))
  assert keys.dtype == np.uint32
  assert keys[0] == keys[1]  # The same caption,
  assert keys[3] == keys[0]  # also where a padded position holds another id;
  assert len({int(keys[0]), int(keys[2]), int(keys[4])}) == 3  # order and length count.
  # 2,000 different random captions of 77 tokens: no two share a key.
  rng = np.random.default_rng(0)
  many = rng.integers(1000, 30000, (2000, 77)).astype(np.int32)
  assert len(set(np.asarray(itm.caption_keys(many, np.ones_like(many))).tolist())) == 2000


def test_examples_of_the_same_caption_or_picture_are_not_each_others_negatives():
  """Captions 0, 2 and 4 are the same (a corpus repeats short captions): their texts match
  each other's images, and their embeddings, equal, would be drawn before any other. Examples
  1 and 3 are two captions of one picture: each text matches the other's image. None is
  drawn for another; the rest follow the similarity, renormalised over what is left. A row
  whose every other example is such falls back to them all."""
  rng = np.random.default_rng(3)
  n, tau, draws = 6, 0.2, 20000
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  text = unit(rng.normal(size=(n, 8)))
  text[2] = text[4] = text[0]  # Same caption, same text embedding.
  image = unit(text + 0.5 * rng.normal(size=(n, 8)))  # Each image near its own text.
  text[3] = unit(text[1] + 0.3 * rng.normal(size=8))  # Another caption of picture 1.
  image[1] = image[3] = text[1]
  captions = np.array([5, 1, 5, 2, 5, 3], np.uint32)
  pictures = np.array([10, 11, 12, 11, 14, 15], np.uint32)
  same = (captions[:, None] == captions[None, :]) | (pictures[:, None] == pictures[None, :])
  assert not same[0, 1] and same[1, 3] and same[0, 4] and not same[1, 2]
  sim = image.astype(np.float64) @ text.T.astype(np.float64)
  t_idx, i_idx = jax.vmap(lambda k: itm.pair_indices(itm.hard_negative_pairs(
      k, image, text, tau, True, (captions, pictures)), n))(
      jax.random.split(jax.random.PRNGKey(7), draws))
  t_idx, i_idx = np.asarray(t_idx), np.asarray(i_idx)

  def expected(row, excluded):
    p = np.where(excluded, 0.0, np.exp(row / tau))
    return p / p.sum()

  for i in range(n):  # Negative texts of image i, then negative images of text i.
    for got, row in ((t_idx[:, i], sim[i]), (i_idx[:, n + i], sim[:, i])):
      freq = np.bincount(got, minlength=n) / draws
      assert not freq[same[i]].any(), (i, freq)
      np.testing.assert_allclose(freq, expected(row, same[i]), atol=0.015, err_msg=str(i))
  # Without the captions, image 0 draws text 2 or 4 (its own text's twins) most of the time.
  plain = np.asarray(jax.vmap(lambda k: itm.hard_negative_pairs(k, image, text, tau)[0][0])(
      jax.random.split(jax.random.PRNGKey(7), 2000)))
  assert np.isin(plain[:, 0], [2, 4]).mean() > 0.5  # Measured: 0.89.
  assert (plain[:, 1] == 3).mean() > 0.5  # Image 1 draws its picture's other caption.
  # Every caption the same: any other example, as without the captions.
  alike = np.asarray(jax.vmap(lambda k: itm.sample_negatives(k, sim, tau, np.ones((n, n), bool)))(
      jax.random.split(jax.random.PRNGKey(8), 4000)))
  for i in range(n):
    freq = np.bincount(alike[:, i], minlength=n) / 4000
    np.testing.assert_allclose(freq, expected(sim[i], np.arange(n) == i), atol=0.03)


def test_a_caption_another_example_gives_the_picture_is_no_negative():
  """Examples 0 (picture P, caption A), 1 (P, B) and 2 (Q, B): text 2, "B", matches image 0,
  as example 1 shows. It was image 0's negative (neither its caption nor its picture is
  example 0's), and the nearest: (P, "B") was taught as a match and a mismatch in one step.
  Likewise image 0 for text 2."""
  # The relation against its definition: some example k has i's picture and j's caption.
  rng = np.random.default_rng(0)
  for n, kinds in ((12, 3), (40, 6), (64, 40)):
    captions = rng.integers(0, kinds, n).astype(np.uint32)
    pictures = (rng.integers(0, kinds, n) * 2654435761 % 2 ** 32).astype(np.uint32)
    eq = lambda k: (k[:, None] == k[None, :]).astype(np.int64)
    want = eq(pictures) @ eq(captions) > 0
    np.testing.assert_array_equal(jax.jit(itm.matching)((captions, pictures)), want)
    np.testing.assert_array_equal(itm.matching((captions,)), eq(captions) > 0)
  captions = np.array([1, 2, 2, 3, 4, 5], np.uint32)
  pictures = np.array([7, 7, 8, 9, 10, 11], np.uint32)
  same = np.asarray(itm.matching((captions, pictures)))
  assert same[0, 2] and not same[2, 0]  # Image Q has no caption A in the batch.
  # Text 2 is image 0's nearest text and image 0 text 2's nearest image.
  rng = np.random.default_rng(1)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  text = unit(rng.normal(size=(6, 8)))
  image = unit(text + 0.3 * rng.normal(size=(6, 8)))
  text[2] = unit(image[0] + 0.05 * rng.normal(size=8))
  t_idx, i_idx = jax.vmap(lambda k: itm.pair_indices(itm.hard_negative_pairs(
      k, image, text, 0.1, True, (captions, pictures)), 6))(
      jax.random.split(jax.random.PRNGKey(2), 2000))
  t_idx, i_idx = np.asarray(t_idx), np.asarray(i_idx)
  assert not np.isin(t_idx[:, 0], [0, 1, 2]).any()  # Image 0: texts 1 and 2 are "B" of P.
  assert not np.isin(i_idx[:, 6 + 2], [0, 1, 2]).any()  # Text 2: images of P and its own.
  # Without the third example's match, image 0 drew text 2 nearly always.
  old = (captions[:, None] == captions[None, :]) | (pictures[:, None] == pictures[None, :])
  drawn = np.asarray(jax.vmap(lambda k: itm.sample_negatives(k, image @ text.T, 0.1, old))(
      jax.random.split(jax.random.PRNGKey(2), 500)))
  assert (drawn[:, 0] == 2).mean() > 0.5
  # Examples (P, A), (P, B), (Q, B): images 0 and 1 and texts 1 and 2 have no negative.
  np.testing.assert_array_equal(
      itm.negative_weights([np.array([1, 2, 2], np.uint32), np.array([7, 7, 8], np.uint32)],
                           True), [0, 0, 1, 1, 0, 0])


def test_examples_without_a_negative_are_left_out_of_the_itm_loss():
  """Examples 0-2 share one caption and 3 has its own: 3 has negatives, and so have 0-2 (text
  3). With every caption the same, no example has one: the fallback draw (a text of the
  image's own caption) is left out, and the loss is the positives' cross-entropy."""
  keys = lambda *k: [np.array(x, np.uint32) for x in k]
  np.testing.assert_array_equal(itm.negative_weights(keys([4, 4, 4, 7])), [1, 1, 1, 1])
  np.testing.assert_array_equal(itm.negative_weights(keys([4, 4, 4]), True), np.zeros(6))
  np.testing.assert_array_equal(itm.negative_weights(keys([4, 4, 9]), True), np.ones(6))
  # Two pictures, each with its own captions: every example has a negative (the other
  # picture's). One picture: none has.
  np.testing.assert_array_equal(itm.negative_weights(keys([1, 2, 3], [8, 8, 9])), np.ones(3))
  np.testing.assert_array_equal(itm.negative_weights(keys([1, 2, 3], [8, 8, 8])), np.zeros(3))
  pos = np.array([[0.0, 2.0], [1.0, -1.0]], np.float32)
  neg = np.array([[3.0, -3.0], [-2.0, 1.0], [0.5, 0.0]], np.float32)
  logp = lambda row, c: row[c] - np.log(np.exp(row).sum())
  loss, m = itm.itm_loss(pos, neg, np.array([1, 0, 1], np.float32))
  expected = -(logp(pos[0], 1) + logp(pos[1], 1) + logp(neg[0], 0) + logp(neg[2], 0)) / 4
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["itm_accuracy"], 3 / 4)  # pos[1] wrong; neg[1] not counted.
