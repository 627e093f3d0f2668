"""Answer heads: the classifier over the answer vocabulary, and the generative decoder's
teacher-forced loss and candidate ranking."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvqa_jax.models import layers


class ClassifierHead(nn.Module):
  """The fused text and image CLS tokens, each pooled (dense + tanh), concatenated, then an
  MLP (2D -> 2D, LayerNorm, GELU -> num_answers) onto the answer vocabulary."""
  num_answers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text_cls, image_cls):
    d = text_cls.shape[-1]
    pooled = jnp.concatenate([
        jnp.tanh(nn.Dense(d, dtype=self.dtype, name="text_pooler")(text_cls)),
        jnp.tanh(nn.Dense(d, dtype=self.dtype, name="image_pooler")(image_cls))], axis=-1)
    h = nn.Dense(2 * d, dtype=self.dtype, name="fc1")(pooled)
    h = layers.exact_gelu(nn.LayerNorm(dtype=self.dtype, name="ln")(h))
    return nn.Dense(self.num_answers, dtype=self.dtype, name="fc2")(h).astype(jnp.float32)


def sequence_log_likelihood(logits, ids, mask):
  """Sum over t >= 1 of log p(ids[t] | ids[<t]) where mask[t] (logits[t] predicts ids[t+1]).

  logits (N, L, V), ids and mask (N, L); returns (N,).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(token * mask[:, 1:], axis=-1)


def generative_loss(logits, ids, mask):
  """Teacher-forced cross-entropy: per answer, the negative log-likelihood of its tokens after
  the first ([CLS]), summed; averaged over the batch."""
  return -jnp.mean(sequence_log_likelihood(logits, ids, mask))


def classifier_loss(logits, labels):
  """Cross-entropy over the answer vocabulary; labels < 0 (answers outside the vocabulary)
  are left out of the mean."""
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)
