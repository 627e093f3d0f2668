"""Answer heads: the classifier over the answer vocabulary, and the generative decoder's
teacher-forced loss and candidate ranking."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax.models import layers


class ClassifierHead(nn.Module):
  """The fused text and image CLS tokens, each pooled (dense + tanh), concatenated, then an
  MLP (2D -> 2D, LayerNorm, GELU -> num_answers) onto the answer vocabulary: METER's VQA
  classifier, its LayerNorm's epsilon PyTorch's default (1e-5)."""
  num_answers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text_cls, image_cls):
    d = text_cls.shape[-1]
    pooled = jnp.concatenate([
        jnp.tanh(nn.Dense(d, dtype=self.dtype, name="text_pooler")(text_cls)),
        jnp.tanh(nn.Dense(d, dtype=self.dtype, name="image_pooler")(image_cls))], axis=-1)
    h = nn.Dense(2 * d, dtype=self.dtype, name="fc1")(pooled)
    h = layers.exact_gelu(layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln")(h))
    # The logits in float32, as the loss reads them (bf16 would round them to 3 digits).
    return nn.Dense(self.num_answers, dtype=jnp.float32, name="fc2")(h)


def token_log_prob(hidden, embedding, bias, target):
  """log p(target) under an LM head's logits hidden @ embedding.T + bias: hidden (..., D),
  embedding (V, D), bias (V,), target (...) int. Returns (...) float32 for float32 hidden.

  The target's logit is picked by comparing the vocabulary's indices with it, not gathered:
  under autodiff a gather's gradient is a scatter into zeros of the logits' size, a
  comparison's joins the softmax's gradient in one pass."""
  logits = jnp.dot(hidden, embedding.T) + bias
  hit = jnp.arange(logits.shape[-1]) == target[..., None]
  picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # One nonzero term: exact.
  return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_log_prob(hidden, embedding, bias, ids):
  """(N, L - 1): log p(ids[t + 1]) under the LM head's logits at t, hidden[:, t] @
  embedding.T + bias (hidden (N, L, D), embedding (V, D), bias (V,), ids (N, L)). The last
  position predicts nothing, and its logits are not made."""
  return token_log_prob(hidden[:, :-1], embedding, bias, ids[:, 1:])


# The most logits `next_token_log_prob_chunked` makes at once (64 MB of float32; split over
# the devices that share the rows).
LOGITS_AT_ONCE = 2 ** 24


def next_token_log_prob_chunked(hidden, embedding, bias, ids, max_logits: int | None = None):
  """`next_token_log_prob`, its logits hidden @ embedding.T + bias (hidden (N, L, D),
  embedding (V, D), bias (V,)) made a few positions at a time (at most
  `max_logits`, default `LOGITS_AT_ONCE`, of them at once, but one position of every row at
  least) and reduced to each position's log-probability of the next token before the next
  positions' are made.

  Ranking candidates made all N x L x V at once: 4 GB for 64 VQA-RAD questions (37
  candidates each, packed into 536 tokens) with BERT's vocabulary, and on a CPU their
  log-softmax and gather took 25 times as long as the matrix product. Returns (N, L - 1)
  float32."""
  h, target = hidden[:, :-1], ids[:, 1:]
  n, length, d = h.shape
  max_logits = max_logits or LOGITS_AT_ONCE
  chunk = max(1, min(length, max_logits // max(1, n * embedding.shape[0])))
  pad = -length % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(n, -1, chunk, d).swapaxes(0, 1)
  target = jnp.pad(target, ((0, 0), (0, pad))).reshape(n, -1, chunk).swapaxes(0, 1)
  out = jax.lax.map(lambda a: token_log_prob(a[0], embedding, bias, a[1]),
                    (h, target))  # (chunks, N, chunk)
  return out.swapaxes(0, 1).reshape(n, -1)[:, :length]


def sequence_log_likelihood(token_logp, mask):
  """Sum over t >= 1 of log p(ids[t] | ids[<t]) where mask[t], from `token_logp` (N, L - 1)
  (`next_token_log_prob`: token_logp[:, t] is that of ids[t + 1]) and mask (N, L).
  Returns (N,)."""
  return jnp.sum(token_logp * mask[:, 1:], axis=-1)


def pack_length(cand_mask, k: int, multiple: int = 8) -> int:
  """The length of a row packing any k of the candidates (the k longest's tokens, rounded up
  to `multiple`), or 0 where packing would not at least halve the decoder's tokens: a packed
  row's self-attention grows with its square, k separate rows' only with theirs."""
  lengths = np.sort(np.asarray(cand_mask).sum(axis=-1))[::-1]
  k = min(k, len(lengths))
  packed = -(-int(lengths[:k].sum()) // multiple) * multiple
  return packed if 2 * packed <= k * np.shape(cand_mask)[-1] else 0


def pack_candidates(cand_ids, cand_mask, topk, length: int):
  """Each question's k candidates (`topk` (B, k) rows of `cand_ids`/`cand_mask` (C, La)),
  their real tokens one after another in one row of `length`: ids (B, length) and
  segment_ids (B, length), candidate j's tokens numbered j, the padding after them k."""
  k, la = topk.shape[1], cand_ids.shape[1]
  lengths = jnp.take(jnp.sum(cand_mask, axis=-1), topk)  # (B, k)
  ends = jnp.cumsum(lengths, axis=-1)
  position = jnp.arange(length)
  segment = jnp.sum(position[None, :, None] >= ends[:, None, :], axis=-1)  # (B, length)
  within = jnp.minimum(segment, k - 1)
  start = jnp.take_along_axis(ends - lengths, within, axis=-1)
  cand = jnp.take_along_axis(topk, within, axis=-1)
  ids = jnp.asarray(cand_ids)[cand, jnp.clip(position[None] - start, 0, la - 1)]
  return jnp.where(segment < k, ids, 0), segment


def packed_log_likelihood(token_logp, segment_ids, k: int):
  """`sequence_log_likelihood` of each of the k candidates packed in a row (`pack_candidates`),
  from `token_logp` (B, L - 1) of the packed row: each position's log-probability of the next
  token counts where that token is of the same segment. Returns (B, k)."""
  same = segment_ids[:, 1:] == segment_ids[:, :-1]
  owner = jax.nn.one_hot(jnp.where(same, segment_ids[:, :-1], k), k, dtype=jnp.float32)
  return jnp.sum(token_logp[..., None] * owner, axis=1)  # Not a matmul: no TF32 rounding on GPUs.


def has_answer(mask):
  """(B,) bool: the answers with a token besides [CLS] and [SEP]. One that normalises to ""
  has none: no candidate is empty, and the classifier leaves it out (label -1) likewise."""
  return jnp.sum(mask, axis=-1) > 2


def generative_loss(token_logp, mask):
  """Teacher-forced cross-entropy: per answer, the negative log-likelihood of its tokens after
  the first ([CLS]), summed; averaged over the answers that `has_answer`. token_logp (N, L - 1)
  as `next_token_log_prob` gives it, mask (N, L)."""
  valid = has_answer(mask)
  nll = -sequence_log_likelihood(token_logp, mask)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def classifier_loss(logits, labels):
  """Cross-entropy over the answer vocabulary; labels < 0 (answers outside the vocabulary)
  are left out of the mean."""
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)
