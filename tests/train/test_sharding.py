"""sharding.prefetch: batches copied to the devices ahead of the step that reads them, in
order, none lost, and the source released when the feed is closed. The mesh's device order:
each process's devices together."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from medvqa_jax.train import sharding


def _source(n, pulled, closed):
  try:
    for i in range(n):
      pulled.append(i)
      yield i
  finally:
    closed.append(True)


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_prefetch_keeps_size_batches_made_ahead_in_order(size):
  pulled, closed = [], []
  feed = sharding.prefetch(_source(4, pulled, closed), size)
  assert next(feed) == 0
  assert len(pulled) == min(4, size + 1)  # The one yielded and `size` more.
  assert list(feed) == [1, 2, 3] and pulled == [0, 1, 2, 3] and closed == [True]


def test_closing_the_feed_closes_its_source():
  pulled, closed = [], []
  feed = sharding.prefetch(_source(10, pulled, closed), 2)
  assert [next(feed), next(feed)] == [0, 1] and pulled == [0, 1, 2, 3]
  feed.close()
  assert closed == [True]  # A stopped run frees the input workers' batches at once.


def test_negative_size_is_refused():
  with pytest.raises(ValueError, match="prefetch size must be >= 0"):
    next(sharding.prefetch(iter([1]), -1))


def test_prefetched_device_batches_hold_the_host_batches():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  host = [{"images": rng.integers(0, 255, (2 * jax.device_count(), 4, 4, 3), dtype=np.uint8),
           "step": np.int32(i)} for i in range(3)]
  feed = sharding.prefetch((sharding.shard_batch(mesh, dict(h)) for h in host), 2)
  for h, d in zip(host, feed, strict=True):
    assert isinstance(d["images"], jax.Array)
    np.testing.assert_array_equal(np.asarray(d["images"]), h["images"])
    assert int(d["step"]) == int(h["step"])



def test_each_process_devices_hold_consecutive_rows_of_the_batch(monkeypatch):
  # A topology that lists devices with processes interleaved: each process's devices are put
  # together (a host feeds consecutive rows), keeping their order within the process.
  listed = [SimpleNamespace(id=i, process_index=(i // 2) % 2) for i in range(8)]
  assert [d.id for d in sharding.by_process(listed)] == [0, 1, 4, 5, 2, 3, 6, 7]
  # The mesh is laid out in that order (one process here: the devices as listed).
  seen = []
  by_process = sharding.by_process
  monkeypatch.setattr(sharding, "by_process", lambda d: seen.append(list(d)) or by_process(d))
  mesh = sharding.make_mesh()
  assert seen == [jax.devices()] and list(mesh.devices.flat) == jax.devices()
