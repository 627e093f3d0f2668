"""sharding.prefetch: batches copied to the devices ahead of the step that reads them, in
order, none lost, and the source released when the feed is closed. The mesh's device order:
each process's devices together."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import helpers
from medvqa_jax.train import sharding

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("rules", [(".*",), ("fusion/.*",), ("^fusion/.*",), ("kernel",)])
def test_optimizer_state_is_sharded_as_its_parameter(rules):
  """Adam's moments take their parameter's sharding whatever the rule's form: one anchored at
  the start (`^fusion/.*`) sharded the parameter and left its moments whole (the rules were
  matched again on the state's longer paths)."""
  from jax.sharding import AbstractMesh, AxisType
  from ml_collections import ConfigDict

  from medvqa_jax.models.state_dict import flatten
  from medvqa_jax.train import optim, step as step_lib
  mesh = AbstractMesh((2, 4), sharding.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)
  params = {"fusion": {"kernel": np.ones((64, 32), np.float32), "bias": np.ones(64, np.float32)},
            "image": {"kernel": np.ones((64, 64), np.float32)},
            "text": {"kernel": np.ones((64, 64), np.float32)}}
  cfg = ConfigDict(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.98, warmup_fraction=0.4,
                        total_steps=10, lr_mults=(("text/.*", 0.0), ("image/.*", 2.0)),
                        grad_clip=1.0))
  shardings = step_lib.state_shardings(mesh, params, optim.make(cfg, params), rules, 64)
  specs = {k: s.spec for k, s in flatten(shardings["params"]).items()}
  assert specs["fusion/kernel"] == jax.sharding.PartitionSpec("fsdp", None)
  moments = 0
  for path, s in flatten(shardings["opt_state"]).items():
    owner = [p for p in specs if path.endswith("/" + p)]
    if owner:
      moments += 1
      assert s.spec == specs[owner[0]], (path, rules)
    else:
      assert s.spec == jax.sharding.PartitionSpec(), path  # Counts: replicated.
  assert moments == 2 * 3  # mu and nu of the trained three (text is frozen: no state).
  # A state array under a parameter's path with another shape (Adafactor's factored second
  # moment) is not the parameter's: it stays whole, where the parameter's spec would not fit.
  state = {"mu": {"fusion": {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32)}},
           "v_row": {"fusion": {"kernel": jax.ShapeDtypeStruct((64,), np.float32)}}}
  follow = flatten(sharding.follow_params(mesh, params, shardings["params"], state))
  assert follow["mu/fusion/kernel"].spec == specs["fusion/kernel"]
  assert follow["v_row/fusion/kernel"].spec == jax.sharding.PartitionSpec()


def test_fsdp_shards_arrays_of_the_minimum_size_on_their_largest_divisible_axis():
  """A parameter of at least fsdp_min_size elements whose path a rule matches is split over
  the fsdp axis along its largest axis that the fsdp size divides; one element fewer, or no
  matching rule, or fsdp=1, and it stays whole on every device."""
  P = jax.sharding.PartitionSpec
  spec = lambda path, shape, fsdp=4, rules=(".*",): sharding.param_spec(path, shape, fsdp,
                                                                        rules, 64)
  assert spec("fusion/bias", (64,)) == P("fsdp")
  assert spec("fusion/bias", (63,)) == P()
  assert spec("fusion/kernel", (8, 12)) == P(None, "fsdp")   # The larger axis.
  assert spec("fusion/kernel", (16, 6)) == P("fsdp", None)   # The larger axis 4 divides.
  assert spec("fusion/kernel", (6, 18)) == P()               # None that 4 divides.
  assert spec("fusion/kernel", (8, 12), fsdp=1) == P()
  assert spec("fusion/kernel", (8, 12), rules=("image/.*",)) == P()


def test_a_batch_is_split_over_both_axes_of_the_mesh():
  """The batch's rows are spread over both mesh axes (data x fsdp), so each device holds its
  own share whatever the fsdp size (over "data" alone, the devices of one fsdp group would
  each compute the same rows); a scalar is replicated."""
  batch = sharding.shard_batch(sharding.make_mesh(), {"x": np.arange(16 * 3).reshape(16, 3),
                                                      "step": np.int32(1)})
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert batch["step"].sharding.spec == jax.sharding.PartitionSpec()


def test_a_rule_that_shards_nothing_is_named(caplog):
  """A rule whose parameters are all under fsdp_min_size, or have no dimension the FSDP size
  divides, ran as plain data parallelism without a word (`decoder/lm_bias`: 28,996
  elements, which 8 does not divide)."""
  params = {"fusion": {"kernel": np.ones((64, 32), np.float32), "bias": np.ones(32, np.float32)},
            "decoder": {"lm_bias": np.ones(28996, np.float32)}}
  assert sharding.idle_rules(params, (".*",), 4, 64) == []
  assert sharding.idle_rules(params, (".*kernel", ".*bias"), 4, 64) == []  # lm_bias: 4 | 28996.
  assert sharding.idle_rules(params, (".*kernel", ".*bias", "lm_bias"), 8, 64) == [".*bias",
                                                                                   "lm_bias"]
  assert sharding.idle_rules(params, ("fusion/.*",), 4, 4096) == ["fusion/.*"]  # 2,048 at most.
  assert sharding.idle_rules(params, ("lm_bias",), 1, 64) == []  # No FSDP: nothing to say.
  # Where the train state is placed (4 devices, FSDP 4): warned of, and the state made.
  code = """
import numpy as np, optax
from medvqa_jax.train import sharding, step
params = {"fusion": {"kernel": np.ones((64, 32), np.float32)}}
mesh = sharding.make_mesh(fsdp=4)
for rules, min_size in ((("fusion/.*",), 4096), ((".*",), 1024)):
  s = step.state_shardings(mesh, params, optax.adam(1e-3), rules, min_size)
  print(rules, tuple(s["params"]["fusion"]["kernel"].spec))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                   "XLA_FLAGS": helpers.xla_flags(4)})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == ["('fusion/.*',) ()", "('.*',) ('fsdp', None)"]
  assert ("train.fsdp_rules ['fusion/.*'] shard none of the parameters they match (each is "
          "under train.fsdp_min_size=4096 elements or has no dimension train.fsdp=4 divides): "
          "those stay whole on every device") in out.stderr, out.stderr[-3000:]
  assert out.stderr.count("shard none") == 1


def test_a_rule_matches_a_whole_path_or_its_end_not_a_part_of_it():
  """An FSDP rule matches a parameter's whole path or its last components: "kernel" and
  "fusion/.*" shard fusion/kernel, but "fusion" or "kern" (a part of the path) match nothing,
  and check_rules refuses them rather than leave the parameters replicated silently."""
  P = jax.sharding.PartitionSpec
  params = {"fusion": {"kernel": np.ones((64, 32), np.float32)},
            "image": {"kernels": np.ones((64, 64), np.float32)}}
  for rules in ((".*kernel",), ("kernel",), ("fusion/.*",), ("fusion/kernel",)):
    sharding.check_rules(params, rules)
    assert sharding.param_spec("fusion/kernel", (64, 32), 4, rules, 64) == P("fsdp", None)
  for rules in (("fusion",), ("kern",), ("usion/kernel",)):
    with pytest.raises(ValueError, match="match no parameter path"):
      sharding.check_rules(params, rules)
    assert sharding.param_spec("fusion/kernel", (64, 32), 4, rules, 64) == P(), rules
  # "kernel" is a path's last component, not the end of one ("image/kernels").
  assert sharding.param_spec("image/kernels", (64, 64), 4, ("kernel",), 64) == P()
