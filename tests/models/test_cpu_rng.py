"""Threefry compiled unrolled on the CPU (medvqa_jax/cpu_rng.py) draws the bits JAX's own
lowering draws: the Threefry-2x32 hash (20 rounds) as a NumPy formula, held to the published
known answers and to the compiled hash."""

import importlib

import jax
import jax.extend.random as jex_random
import numpy as np

importlib.import_module("medvqa_jax.models")  # Installs the lowering, as every command does.

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_2x32(key, count):
  """Threefry-2x32 with 20 rounds (Salmon et al., 2011), as JAX computes it: NumPy uint32."""
  key, x = np.asarray(key, np.uint32), [c.copy() for c in np.asarray(count, np.uint32)]
  # Arrays, not NumPy scalars: uint32 sums wrap around without a warning.
  ks = [np.full(1, k, np.uint32) for k in (key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA)]
  x[0] += ks[0]
  x[1] += ks[1]
  for block in range(5):
    for r in ROTATIONS[block % 2]:
      x[0] += x[1]
      x[1] = (x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))
      x[1] ^= x[0]
    x[0] += ks[(block + 1) % 3]
    x[1] += ks[(block + 2) % 3] + np.uint32(block + 1)
  return np.stack(x)


def test_the_numpy_hash_gives_the_published_answers():
  # Random123's known-answer vectors for Threefry-2x32-20.
  for key, count, want in (((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                           ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 2, (0x1CB996FC, 0xBB002BE7)),
                           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3),
                            (0xC4923A9C, 0x483DF7A0))):
    got = threefry_2x32(key, np.asarray(count, np.uint32)[:, None])[:, 0]
    assert [int(v) for v in got] == list(want)


def test_the_cpu_compiles_the_hash_unrolled_and_it_draws_the_same_bits():
  hash_ = jax.jit(jex_random.threefry_2x32)
  key = np.uint32([0x13198A2E, 0x03707344])
  count = np.random.default_rng(0).integers(0, 2 ** 32, 4096, dtype=np.uint32)
  # Rolled, the lowering was a loop over the rounds.
  assert "while" not in hash_.lower(key, count).as_text()
  got = np.asarray(hash_(key, count))
  want = threefry_2x32(key, count.reshape(2, -1)).reshape(-1)
  np.testing.assert_array_equal(got, want)
