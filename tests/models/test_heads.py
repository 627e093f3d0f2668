"""The answer heads against NumPy: the classifier MLP, its loss, and the teacher-forced loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvqa_jax.models import heads, layers


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _lm_head(rng, n, length, d, vocab):
  """Random LM-head inputs in float32: hidden (n, length, d), embedding (vocab, d), bias
  (vocab,), and token ids (n, length)."""
  return (rng.normal(size=(n, length, d)).astype(np.float32),
          rng.normal(size=(vocab, d)).astype(np.float32),
          rng.normal(size=(vocab,)).astype(np.float32),
          rng.integers(0, vocab, (n, length)).astype(np.int32))


@pytest.mark.parametrize("fc1_scale", [1.0, 1e-3])
def test_classifier_head_equals_numpy(fc1_scale):
  """METER's classifier; at fc1_scale 1e-3 the LayerNorm's input varies by about 1e-5, where
  its epsilon (PyTorch's default, 1e-5) decides the output."""
  rng = np.random.default_rng(0)
  text_cls, image_cls = rng.normal(size=(2, 4, 8)).astype(np.float32)
  head = heads.ClassifierHead(num_answers=7)
  params = head.init(jax.random.PRNGKey(0), text_cls, image_cls)["params"]
  # Random LayerNorm and biases, so that none of them is a no-op.
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  params["fc1"] = jax.tree.map(lambda x: x * np.float32(fc1_scale), params["fc1"])
  got = head.apply({"params": params}, text_cls, image_cls)

  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
  h = dense("fc1", np.concatenate([np.tanh(dense("text_pooler", text_cls)),
                                   np.tanh(dense("image_pooler", image_cls))], axis=-1))
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = h * p["ln"]["scale"] + p["ln"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # Exact GELU.
  np.testing.assert_allclose(got, dense("fc2", h), rtol=1e-4, atol=1e-4)
  # The text and image inputs are not interchangeable.
  assert np.max(np.abs(got - head.apply({"params": params}, image_cls, text_cls))) > 1e-2



def test_classifier_logits_are_float32_in_a_bf16_head():
  """In a bf16 head, the last layer still computes in float32 (from its bf16 input), so the
  loss reads logits that were not rounded to bf16's 3 digits."""
  rng = np.random.default_rng(3)
  text_cls, image_cls = rng.normal(size=(2, 4, 8)).astype(np.float32)
  head = heads.ClassifierHead(num_answers=7, dtype=jnp.bfloat16)
  params = head.init(jax.random.PRNGKey(0), text_cls, image_cls)["params"]
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  got, state = head.apply({"params": params}, text_cls, image_cls,
                          capture_intermediates=True)
  assert got.dtype == jnp.float32
  h = np.asarray(layers.exact_gelu(state["intermediates"]["ln"]["__call__"][0]), np.float64)
  fc2 = jax.tree.map(lambda x: np.asarray(x, np.float64), params["fc2"])
  np.testing.assert_allclose(got, h @ fc2["kernel"] + fc2["bias"], rtol=1e-5, atol=1e-5)

def test_classifier_loss_averages_over_in_vocabulary_labels_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = np.array([2, -1, 0, 4, -1, 1], np.int32)  # -1: an answer outside the vocabulary.
  valid = labels >= 0
  logp = _log_softmax(logits)
  expected = -np.mean(logp[np.arange(6)[valid], labels[valid]])
  np.testing.assert_allclose(heads.classifier_loss(logits, labels), expected, rtol=1e-5)
  # The left-out rows' logits do not matter at all.
  other = logits.copy()
  other[~valid] = rng.normal(size=(2, 5)) * 10
  np.testing.assert_allclose(heads.classifier_loss(other, labels), expected, rtol=1e-5)
  # A batch with no label in the vocabulary gives 0, not NaN.
  assert float(heads.classifier_loss(logits, np.full(6, -1, np.int32))) == 0.0


def test_generative_loss_is_the_batch_mean_of_answer_negative_log_likelihoods():
  """Per answer: minus the sum over its tokens after [CLS] of log p(token | the ones before),
  where the LM head's logits at t (hidden[t] @ embedding.T + bias) predict ids[t + 1]; then
  the mean over the answers with a token besides [CLS] and [SEP]."""
  rng = np.random.default_rng(2)
  b, length, d, vocab = 4, 6, 5, 11
  hidden, embedding, bias, ids = _lm_head(rng, b, length, d, vocab)  # Pads hold real ids.
  lengths = np.array([6, 4, 3, 2])
  mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 0
  logp = _log_softmax(hidden.astype(np.float64) @ embedding.T.astype(np.float64) + bias)
  per_answer = np.array([sum(logp[i, t - 1, ids[i, t]] for t in range(1, lengths[i]))
                         for i in range(b)])
  token_logp = heads.next_token_log_prob(hidden, embedding, bias, ids)
  assert token_logp.shape == (b, length - 1) and token_logp.dtype == np.float32
  np.testing.assert_allclose(heads.sequence_log_likelihood(token_logp, mask), per_answer,
                             rtol=1e-5)
  # Answer 3 is [CLS] [SEP] alone (an answer that normalises to ""): no candidate is empty
  # and the classifier leaves it out, so the mean is over the other three.
  np.testing.assert_allclose(heads.generative_loss(token_logp, mask), -per_answer[:3].mean(),
                             rtol=1e-5)
  assert float(heads.generative_loss(token_logp, np.minimum(mask, np.arange(length) < 2))) == 0


def test_token_log_prob_gradients_equal_the_gathered_log_softmax():
  """Picking the target's logit by comparison (`token_log_prob`) gives the gradients, with
  respect to the hidden states, the embedding and the bias, of the log-softmax gathered at
  the target (`take_along_axis`), in float32; and both equal the float64 formula
  d/dlogits = onehot(target) - softmax(logits), chained by hand."""
  rng = np.random.default_rng(4)
  n, length, d, vocab = 3, 5, 6, 17
  hidden, embedding, bias, target = _lm_head(rng, n, length, d, vocab)
  weight = rng.normal(size=(n, length)).astype(np.float32)  # A cotangent of every position.

  def gathered(h, e, b):
    logp = jax.nn.log_softmax(jnp.dot(h, e.T) + b, axis=-1)
    return jnp.sum(weight * jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0])

  picked = lambda h, e, b: jnp.sum(weight * heads.token_log_prob(h, e, b, target))
  got = jax.grad(picked, argnums=(0, 1, 2))(hidden, embedding, bias)
  ref = jax.grad(gathered, argnums=(0, 1, 2))(hidden, embedding, bias)
  h64, e64 = hidden.astype(np.float64), embedding.astype(np.float64)
  logits = h64 @ e64.T + bias
  dlogits = weight[..., None] * (np.eye(vocab)[target] - np.exp(_log_softmax(logits)))
  want = (dlogits @ e64, np.einsum("nlv,nld->vd", dlogits, h64), dlogits.sum((0, 1)))
  for name, g, r, w in zip(("hidden", "embedding", "bias"), got, ref, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_next_token_log_probs_made_a_few_positions_at_a_time_equal_numpy():
  """The LM head's logits (hidden @ embedding.T + bias) made a few positions at a time, each
  chunk reduced before the next: the log-softmax of all of them at once, picked at the next
  token. Chunk sizes that divide the positions, that do not (the last chunk padded), and a
  budget under one position of every row (one position at a time); jitted, as ranking is."""
  rng = np.random.default_rng(3)
  n, length, d, vocab = 5, 9, 6, 13
  hidden, embedding, bias, ids = _lm_head(rng, n, length, d, vocab)
  logp = _log_softmax(hidden.astype(np.float64) @ embedding.T.astype(np.float64) + bias)
  want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  for max_logits in (1, n * vocab * 2, n * vocab * 3, n * vocab * 8, n * vocab * 100):
    chunked = jax.jit(lambda *a, m=max_logits: heads.next_token_log_prob_chunked(
        *a, max_logits=m))
    got = chunked(hidden, embedding, bias, ids)
    assert got.shape == (n, length - 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(max_logits))
  # The same as from the logits made at once.
  np.testing.assert_allclose(heads.next_token_log_prob(hidden, embedding, bias, ids), want,
                             rtol=1e-5, atol=1e-5)
