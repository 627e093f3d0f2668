"""Image-text matching with hard negatives sampled over the global batch.

For image i a negative text j != i is drawn with probability proportional to
exp(sim(i, j) / tau) (never the positive; defined for negative similarities too, unlike
sampling on raw cosines); optionally a negative image per text likewise. A text that the batch
shows to match image i is not drawn either (`matching`): one whose caption is i's (a corpus
repeats short captions), one of i's picture (a picture with several captions), and one whose
caption another example gives i's picture. Its embedding, close to a positive's, would be
drawn first, and the pair taught as a mismatch in the step that teaches it as a match. An
example with no other candidate has no negative: its draw is left out of the loss. Indices
are global: the arrays are the global batch, whatever the device layout. The sampled pairs
are scored by the model with the negative's own tokens and attention mask.

The pairs are segments (`hard_negative_pairs`): each a (text_idx, image_idx) pair of index
arrays, one entry per example, None standing for the batch's own examples in order. The model
then gathers only the side that was drawn: under data parallelism a gather from the global
batch moves the whole batch's tokens to every device, and the image side of the negative
texts' pairs, the images themselves, needs none. It gathers the towers' outputs (frozen in
stage 1: nothing to send back) and fuses each example's pairs on the device that holds it
(`AMiF.pretrain`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax.losses import contrastive


def caption_keys(input_ids, attention_mask):
  """(N,) uint32: one key per caption, equal for equal token sequences (a polynomial hash of
  the real tokens modulo 2**32; two different captions share a key with probability about
  2**-32, which would only leave a pair out of the negatives). Computed per example, so
  under data parallelism only the keys, not the tokens, are gathered."""
  weights = np.ones(input_ids.shape[-1], np.uint64)
  for k in range(1, len(weights)):
    weights[k] = weights[k - 1] * 1_000_003 % 2 ** 32
  tokens = jnp.where(attention_mask > 0, input_ids + 1, 0).astype(jnp.uint32)
  return jnp.sum(tokens * jnp.asarray(weights.astype(np.uint32)), axis=-1, dtype=jnp.uint32)


def matching(keys):
  """(N, N) bool: True where image i and text j are a match the batch shows, so that text j is
  not image i's negative nor image i text j's: where some example k has i's picture and j's
  caption. keys: the captions' `caption_keys` (N,), then optionally the pictures' keys (N,);
  without them each example is its own picture. That is j's caption being i's (k = i), j's
  picture being i's (k = j), and a third example's: with examples (picture P, caption A),
  (P, B) and (Q, B), text "B" of Q matches image P. Not symmetric: a text's row is a column
  of it. None for no keys.

  Exact, in O(N^2): the pictures' classes each take the union of their captions' matches
  (a segment maximum), where a product of the two relations would cost N^3."""
  keys = list(keys)
  if not keys:
    return None
  captions = jnp.asarray(keys[0])
  n = captions.shape[0]
  same_caption = captions[:, None] == captions[None, :]
  if len(keys) < 2:
    return same_caption
  _, picture = jnp.unique(jnp.asarray(keys[1]), size=n, return_inverse=True)
  picture = picture.reshape(n)
  # Row p: the texts whose caption some example of picture p has.
  shown = jax.ops.segment_max(same_caption.astype(jnp.uint8), picture, num_segments=n)
  return shown[picture] > 0


def sample_negatives(key, sim, temperature, same=None):
  """For each row i of `sim` (N, N), one column j != i drawn with p ∝ exp(sim[i, j] / tau).
  same: (N, N) bool (`matching`, transposed for rows of texts), True where j may not be i's
  negative; a row with every
  column excluded draws from every j != i, to keep the shapes fixed, and `negative_weights`
  leaves that draw out of the loss."""
  logits = jax.lax.stop_gradient(sim.astype(jnp.float32)) / temperature
  eye = jnp.eye(sim.shape[0], dtype=bool)
  excluded = eye if same is None else same | eye
  excluded = jnp.where(jnp.all(excluded, axis=-1, keepdims=True), eye, excluded)
  logits = jnp.where(excluded, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


def negative_weights(keys, negative_images=False):
  """(M,) float32, in the layout of `hard_negative_pairs`: 1 for a drawn negative, 0 where the
  example has no negative in the batch (every other text matches its image, or every other
  image its text: `matching`), so that the draw, a match, is not taught as a mismatch."""
  same = matching(keys)
  weights = [jnp.any(~same, axis=-1)]
  if negative_images:
    weights.append(jnp.any(~same, axis=0))
  return jnp.concatenate(weights).astype(jnp.float32)


def hard_negative_pairs(key, image_embed, text_embed, temperature, negative_images=False,
                        keys=()):
  """The negative pairs as segments (text_idx, image_idx), None for the batch in order: a
  negative text for every image, [(text_idx, None)], then (with `negative_images`) a negative
  image for every text, (None, image_idx). keys: (N,) keys of the examples' captions
  (`caption_keys`) and pictures: a pair the batch shows to match is not drawn (`matching`).
  `pair_indices` gives the flat index arrays."""
  sim = contrastive.similarity(image_embed, text_embed)  # image x text
  same = matching(keys)
  k_text, k_image = jax.random.split(key)
  segments = [(sample_negatives(k_text, sim, temperature, same), None)]
  if negative_images:
    segments.append((None, sample_negatives(k_image, sim.T, temperature,
                                            None if same is None else same.T)))
  return segments


def pair_indices(segments, n: int):
  """(text_idx, image_idx) (P,) of pairs given as segments (`hard_negative_pairs`), None
  standing for arange(n)."""
  fill = lambda idx: jnp.arange(n) if idx is None else jnp.asarray(idx)
  return (jnp.concatenate([fill(t) for t, _ in segments]),
          jnp.concatenate([fill(i) for _, i in segments]))


def itm_loss(pos_logits, neg_logits, neg_weights=None):
  """Cross-entropy on the ITM logits (class 1 = match): positives then negatives, averaged over
  the positives and the negatives of nonzero `neg_weights` (`negative_weights`; all by
  default)."""
  logits = jnp.concatenate([pos_logits, neg_logits]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(pos_logits.shape[0], jnp.int32),
                            jnp.zeros(neg_logits.shape[0], jnp.int32)])
  if neg_weights is None:
    neg_weights = jnp.ones(neg_logits.shape[0], jnp.float32)
  weights = jnp.concatenate([jnp.ones(pos_logits.shape[0], jnp.float32), neg_weights])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  mean = lambda x: jnp.sum(weights * x) / jnp.sum(weights)
  return mean(nll), {"itm_accuracy": mean(correct)}
