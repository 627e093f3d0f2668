"""Image-text matching with hard negatives sampled over the global batch.

For image i a negative text j != i is drawn with probability proportional to
exp(sim(i, j) / tau) (never the positive; defined for negative similarities too, unlike
sampling on raw cosines); optionally a negative image per text likewise. Indices are global:
the arrays are the global batch, whatever the device layout. The sampled pairs are scored by
the model with the negative's own tokens and attention mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvqa_jax.losses import contrastive


def sample_negatives(key, sim, temperature):
  """For each row i of `sim` (N, N), one column j != i drawn with p ∝ exp(sim[i, j] / tau)."""
  logits = jax.lax.stop_gradient(sim.astype(jnp.float32)) / temperature
  logits = jnp.where(jnp.eye(sim.shape[0], dtype=bool), -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


def hard_negative_pairs(key, image_embed, text_embed, temperature, negative_images=False):
  """(text_idx, image_idx) of the negative pairs, and their count. First a negative text for
  every image, then (with `negative_images`) a negative image for every text."""
  sim = contrastive.similarity(image_embed, text_embed)  # image x text
  n = sim.shape[0]
  k_text, k_image = jax.random.split(key)
  text_idx = [sample_negatives(k_text, sim, temperature)]
  image_idx = [jnp.arange(n)]
  if negative_images:
    text_idx.append(jnp.arange(n))
    image_idx.append(sample_negatives(k_image, sim.T, temperature))
  return jnp.concatenate(text_idx), jnp.concatenate(image_idx)


def itm_loss(pos_logits, neg_logits):
  """Cross-entropy on the ITM logits (class 1 = match): positives then negatives."""
  logits = jnp.concatenate([pos_logits, neg_logits]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(pos_logits.shape[0], jnp.int32),
                            jnp.zeros(neg_logits.shape[0], jnp.int32)])
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"itm_accuracy": accuracy}
