"""BERT's hidden dropout: on only when a module is applied with a "dropout" rng (the train
step), the identity otherwise (evaluation, initialisation); the same with scanned or
rematerialised layers, whose blocks draw it from explicit keys."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medvqa_jax.models import amif, layers
from medvqa_jax.models.bert import BertEncoder


class _Drop(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.dropout(self, 0.25, x)


def test_dropout_drops_at_its_rate_and_rescales_only_in_training():
  x = jnp.ones((200, 100))
  module = _Drop()
  np.testing.assert_array_equal(module.apply({}, x), x)  # No rng: the identity.
  y = np.asarray(module.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)}))
  assert abs(np.mean(y == 0) - 0.25) < 0.01
  np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)  # Expectation kept.


def test_dropout_draws_16_bits_per_element_and_keeps_the_expectation():
  """Four elements from each 64-bit draw (an eighth of the random bits of a float per
  element); the rate in steps of 2^-16 and the scale its exact inverse; the four quarters of
  a draw drop independently; any last dimension, odd included; the input's dtype."""
  key = jax.random.PRNGKey(3)
  x = jnp.ones((512, 1001), jnp.bfloat16)
  keep, keep_prob = layers.keep_mask(key, 0.1, x.shape)
  assert keep.shape == x.shape and keep_prob == 1 - 6554 / 65536  # 0.1 -> 0.1000061.
  drop = ~np.asarray(keep)
  n, p = drop.size, 6554 / 65536
  assert abs(drop.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # The quarters of one draw (columns 4i + a): each at the rate, any two at its square.
  quarters = [drop[:, a:1000:4] for a in range(4)]
  for a in range(4):
    assert abs(quarters[a].mean() - p) < 5 * np.sqrt(p * (1 - p) / quarters[a].size)
    for b in range(a + 1, 4):
      both = (quarters[a] & quarters[b]).mean()
      assert abs(both - p * p) < 5 * np.sqrt(p * p / quarters[a].size), (a, b)
  y = _Drop01().apply({}, x, rngs={"dropout": key})
  assert y.dtype == jnp.bfloat16
  y = np.asarray(y, np.float32)
  assert abs((y == 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # The module's own key.
  np.testing.assert_allclose(y[y != 0], float(jnp.bfloat16(1 / keep_prob)))
  with pytest.raises(ValueError, match="rate must be in \\[0, 1\\), got 1.0"):
    layers.keep_mask(key, 1.0, (4, 4))


def test_threefry_matches_its_published_answers_and_jax():
  """The in-line hash against the known answers of Threefry-2x32-20 (Random123's kat_vectors,
  which JAX's tests also check) and JAX's own kernel."""
  from jax.extend.random import threefry_2x32
  cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for key, (c0, c1), expected in cases:
    key = jnp.asarray(key, jnp.uint32)
    got = layers.threefry2x32(key, jnp.uint32(c0), jnp.uint32(c1))
    assert tuple(int(w) for w in got) == expected
  rng = np.random.default_rng(0)
  key = jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))
  counts = rng.integers(0, 2 ** 32, (2, 1000), dtype=np.uint64).astype(np.uint32)
  got = layers.threefry2x32(key, jnp.asarray(counts[0]), jnp.asarray(counts[1]))
  # JAX's threefry_2x32 hashes the pairs (count[i], count[n/2 + i]).
  want = np.asarray(threefry_2x32(key, jnp.asarray(counts.reshape(-1))))
  np.testing.assert_array_equal(np.concatenate([np.asarray(w) for w in got]), want)


@pytest.mark.parametrize("shape", [(3, 5, 10), (7, 8), (1, 3)])
def test_dropout_bits_are_jax_64_bit_draws_split_in_four(shape):
  """A ThreeFry key's mask is `jax.random.bits(key, (..., ceil(n / 4)), uint64)` split into
  16-bit quarters (high word's low half first), each compared with the rate: JAX's draws, as
  a 64-bit run would make them, with no random-bits kernel in the program (the hash is
  in-line, for XLA to fuse with the mask's users)."""
  key = jax.random.key(7)
  keep, _ = layers.keep_mask(key, 0.1, shape)
  *lead, last = shape
  with jax.enable_x64(True):
    words = np.asarray(jax.random.bits(key, (*lead, -(-last // 4)), jnp.uint64))
  quarters = np.stack([(words >> 32) & 0xFFFF, words >> 48, words & 0xFFFF,
                       (words >> 16) & 0xFFFF], axis=-1).reshape(*lead, -1)[..., :last]
  np.testing.assert_array_equal(np.asarray(keep), quarters >= 6554)
  jaxpr = str(jax.make_jaxpr(lambda k: layers.keep_mask(k, 0.1, shape))(key))
  assert "threefry2x32" not in jaxpr and "random_bits" not in jaxpr
  # Raw key data (PRNGKey's) is a ThreeFry key: the same mask.
  raw = jax.random.key_data(key)
  np.testing.assert_array_equal(np.asarray(layers.keep_mask(raw, 0.1, shape)[0]),
                                np.asarray(keep))


def test_dropout_with_an_rbg_key_draws_through_jax():
  """train.rng=rbg: 32-bit words of jax.random.bits, two elements each, at the rate."""
  key = jax.random.key(5, impl="rbg")
  keep, keep_prob = layers.keep_mask(key, 0.25, (300, 101))
  words = np.asarray(jax.random.bits(key, (300, 51), jnp.uint32))
  halves = np.stack([words & 0xFFFF, words >> 16], -1).reshape(300, -1)[:, :101]
  np.testing.assert_array_equal(np.asarray(keep), halves >= 16384)
  assert keep_prob == 0.75


class _Drop01(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.dropout(self, 0.1, x)


@pytest.mark.parametrize("compute", [layers.Compute(), layers.Compute(scan=True),
                                     layers.Compute(remat="full")], ids=["plain", "scan", "remat"])
def test_bert_dropout_is_on_only_with_a_key(compute):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, (2, 7))
  mask = (np.arange(7)[None] < np.array([[7], [4]])).astype(np.int32)
  plain = BertEncoder(vocab_size=100, max_positions=16, width=32, depth=3, num_heads=4,
                      mlp_dim=64, pooler="cls")
  params = plain.init(jax.random.PRNGKey(0), ids, mask)["params"]
  module = plain.clone(dropout=0.1, compute=compute)
  run = lambda key=None: np.asarray(module.apply(
      {"params": params}, ids, mask, rngs=None if key is None else {"dropout": key})["tokens"])
  # Without a key: exactly the module without dropout (evaluation).
  np.testing.assert_allclose(run(), plain.apply({"params": params}, ids, mask)["tokens"],
                             atol=2e-5)
  a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, run(jax.random.PRNGKey(1)))  # A key gives one draw.
  # Dropout is on, in every layer: the outputs move from evaluation's, and with the key.
  assert np.max(np.abs(a - run())) > 1e-2 and np.max(np.abs(a - b)) > 1e-2


def _drawn_masks(monkeypatch) -> list:
  """The keep masks the dropout layers draw, in the order drawn (filled as they run)."""
  masks, keep_mask = [], layers.keep_mask

  def spy(key, rate, shape):
    keep, prob = keep_mask(key, rate, shape)
    jax.debug.callback(lambda m: masks.append(np.asarray(m)), keep)
    return keep, prob
  monkeypatch.setattr(layers, "keep_mask", spy)
  return masks


@pytest.mark.parametrize("compute", [layers.Compute(), layers.Compute(scan=True),
                                     layers.Compute(remat="full")], ids=["plain", "scan", "remat"])
def test_bert_draws_a_mask_of_its_own_after_the_embeddings_and_in_each_layer(compute,
                                                                             monkeypatch):
  """HF's hidden dropout: after the embeddings' LayerNorm and after each layer's attention
  and MLP, 1 + 2 x depth masks, each its own draw (a scanned or rematerialised stack drew
  the same ones in every layer), each at the rate."""
  masks = _drawn_masks(monkeypatch)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, (4, 16))
  mask = np.ones((4, 16), np.int32)
  plain = BertEncoder(vocab_size=100, max_positions=16, width=64, depth=3, num_heads=4,
                      mlp_dim=128, pooler="cls")
  params = plain.init(jax.random.PRNGKey(0), ids, mask)["params"]
  module = plain.clone(dropout=0.25, compute=compute)
  module.apply({"params": params}, ids, mask, rngs={"dropout": jax.random.PRNGKey(1)})
  jax.effects_barrier()
  assert len(masks) == 1 + 2 * 3 and all(m.shape == (4, 16, 64) for m in masks)
  assert len({m.tobytes() for m in masks}) == len(masks)
  assert all(abs(1 - m.mean() - 0.25) < 0.03 for m in masks)
  # The first: the embeddings (a stack of no layers drops there alone, at the rate).
  bare = plain.clone(depth=0)
  x = bare.apply({"params": params}, ids, mask)["tokens"]
  a = np.asarray(bare.clone(dropout=0.25).apply({"params": params}, ids, mask,
                                                rngs={"dropout": jax.random.PRNGKey(1)})["tokens"])
  kept = a != 0
  assert abs(1 - kept.mean() - 0.25) < 0.03
  np.testing.assert_allclose(a[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)


@pytest.mark.parametrize("compute", [layers.Compute(), layers.Compute(scan=True)],
                         ids=["plain", "scan"])
def test_the_fusion_draws_a_mask_after_each_sublayer_of_each_stream(compute, monkeypatch):
  """The co-attention fusion's hidden dropout (model.dropout): after the self-attention, the
  cross-attention and the MLP of each stream's layer, each mask its own draw; none without a
  key, where it computes what a fusion without dropout does."""
  from medvqa_jax.models.fusion import CoAttentionFusion
  masks = _drawn_masks(monkeypatch)
  rng = np.random.default_rng(0)
  text, image = rng.normal(size=(2, 8, 32)), rng.normal(size=(2, 10, 32))
  text_mask = (np.arange(8)[None] < np.array([[8], [5]])).astype(np.int32)
  plain = CoAttentionFusion(num_layers=2, num_heads=4, mlp_dim=64, compute=compute)
  params = plain.init(jax.random.PRNGKey(0), text, text_mask, image)["params"]
  module = plain.clone(dropout=0.25)
  run = lambda **kw: module.apply({"params": params}, text, text_mask, image, **kw)
  for evaluation, reference in zip(run().values(),
                                   plain.apply({"params": params}, text, text_mask, image).values()):
    np.testing.assert_allclose(evaluation, reference, atol=1e-6)
  jax.effects_barrier()
  assert masks == []
  run(rngs={"dropout": jax.random.PRNGKey(1)})
  jax.effects_barrier()
  shapes = sorted(m.shape for m in masks)
  assert shapes == [(2, 8, 32)] * 6 + [(2, 10, 32)] * 6  # 2 layers x 3 sublayers, per stream.
  assert len({m.tobytes() for m in masks}) == len(masks)
  assert all(abs(1 - m.mean() - 0.25) < 0.06 for m in masks)


def test_the_training_objective_draws_dropout_and_evaluation_does_not():
  from medvqa_jax.train import step as step_lib
  config = helpers.tiny_config()
  config.model.dropout = 0.1  # The recipe's (the demo, and so the tiny config, has none).
  model, params = amif.create(config)
  assert model.dropout == model.text.dropout == model.decoder.dropout == 0.1
  assert not hasattr(model.image, "dropout")  # The ViTs have none (CLIP and timm have 0).
  rng = np.random.default_rng(0)
  n = 4
  a = np.zeros((n, 8), np.int32)
  a[:, 0], a[:, 1], a[:, 2] = 101, rng.integers(1000, 5000, n), 102
  batch = dict(images=rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8),
               input_ids=rng.integers(1000, 5000, (n, 12)).astype(np.int32),
               attention_mask=np.ones((n, 12), np.int32), answer_ids=a,
               answer_mask=(a > 0).astype(np.int32))
  prior = (np.arange(2000, 2064, dtype=np.int32), np.ones(64, np.int32))
  objective = jax.jit(step_lib.finetune_objective(model, *prior))
  loss = lambda seed: float(objective(params, batch, jax.random.PRNGKey(seed))[0])
  # Jitted: one program, where op by op compiled some 300 (about 20 s on a 2-core CPU).
  evaluation = float(jax.jit(lambda p: model.apply(
      {"params": p}, batch["images"], batch["input_ids"], batch["attention_mask"], *prior,
      answer_ids=a, answer_mask=batch["answer_mask"], method=amif.AMiF.vqa)["loss"])(params))
  assert loss(0) == loss(0) and loss(0) != loss(1)
  assert abs(loss(0) - evaluation) > 1e-4
  # With dropout off in the config, training computes exactly what evaluation does.
  config.model.dropout = 0.0
  model, params0 = amif.create(config)
  objective = jax.jit(step_lib.finetune_objective(model, *prior))
  np.testing.assert_allclose(float(objective(params0, batch, jax.random.PRNGKey(0))[0]),
                             evaluation, rtol=1e-5)


def test_an_element_whose_bits_equal_the_threshold_is_kept():
  """An element is dropped where its 16 bits are below rate * 2^16, kept where they equal it
  (so the drop probability is exactly the rounded rate): with the rate set to one element's
  own 16 bits over 2^16, that element is kept, and the mask is `bits >= threshold` from
  JAX's 64-bit draws split in four (as above), for ThreeFry keys and for rbg's 32-bit ones."""
  key = jax.random.key(11)
  with jax.enable_x64(True):
    words = np.asarray(jax.random.bits(key, (6, 2), jnp.uint64))
  bits = np.stack([(words >> 32) & 0xFFFF, words >> 48, words & 0xFFFF,
                   (words >> 16) & 0xFFFF], axis=-1).reshape(6, 8)
  rbg = jax.random.key(11, impl="rbg")
  rbg_words = np.asarray(jax.random.bits(rbg, (6, 4), jnp.uint32))
  rbg_bits = np.stack([rbg_words & 0xFFFF, rbg_words >> 16], -1).reshape(6, 8)
  for k, b in ((key, bits), (rbg, rbg_bits)):
    threshold = int(b[2, 5])
    assert 0 < threshold
    keep, keep_prob = layers.keep_mask(k, threshold / 2 ** 16, (6, 8))
    assert keep[2, 5] and keep_prob == 1 - threshold / 2 ** 16
    np.testing.assert_array_equal(np.asarray(keep), b >= threshold)
