"""Checkpoints whose files were damaged after they were written, and restores onto another
model: clear errors naming the step and what to do, nothing deleted."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvqa_jax.train import checkpoint as ckpt_lib


def state(width=4, extra=False):
  params = {"dense": {"kernel": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width),
                      "bias": jnp.ones(width)}}
  if extra:
    params["head"] = {"kernel": jnp.zeros((width, 2))}
  return {"params": params, "step": jnp.int32(0)}


def abstract(tree):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


@pytest.fixture
def folder(tmp_path):
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=5)
  for step, acc in ((2, 0.5), (4, 0.7), (6, 0.6)):
    val = {"val_accuracy": acc}
    ckpts.save(step, state(), {"step": step, "val": val}, metrics=val)
  ckpts.close()
  return tmp_path / "checkpoints"


def largest_file(path):
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_intact_steps_restore(folder):
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  restored, run = ckpts.restore(6, abstract(state()))
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"],
                                state()["params"]["dense"]["kernel"])
  assert run["step"] == 6 and ckpts.best_step() == 4


def test_damaged_state_names_the_step_and_what_to_do(folder):
  victim = largest_file(folder / "6" / "state")
  victim.write_bytes(victim.read_bytes()[:10])
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  with pytest.raises(ckpt_lib.UnreadableCheckpoint) as e:
    ckpts.restore(6, abstract(state()))
  message = str(e.value)
  assert "step 6" in message and f"delete {folder / '6'}" in message
  assert "[2, 4]" in message and "--step" in message
  assert ckpts.restore(4, abstract(state()))[1]["step"] == 4  # Others still restore.
  assert (folder / "6").is_dir()  # Nothing deleted.


def test_damaged_run_record_is_passed_over_in_choosing_the_best(folder, caplog):
  record = folder / "4" / "run" / "metadata"  # The JSON record.
  record.write_text(record.read_text()[:5])
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match="step 4"):
    ckpts.run_record(4)
  with caplog.at_level(logging.WARNING):
    assert ckpts.best_step() == 6  # 4 (the best) cannot be read; then 6 (0.6) over 2 (0.5).
  assert "passed over" in caplog.text and "step 4" in caplog.text


def test_restoring_onto_another_model_names_the_parameters(folder):
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  with pytest.raises(ValueError) as e:
    ckpts.restore(6, abstract(state(width=8, extra=True)))
  message = str(e.value)
  assert not isinstance(e.value, ckpt_lib.UnreadableCheckpoint)
  assert "another model" in message and "head/kernel" in message
  assert "dense/kernel (3, 4) saved, (3, 8) now" in message
  with pytest.raises(ValueError, match="dense/bias"):
    ckpts.restore_params(6, abstract(state(width=8)["params"]))
  # Some of the saved parameters, as init_from takes them: partial.
  some = abstract({"dense": {"bias": jnp.ones(4)}})
  with pytest.raises(ValueError, match=r"saved but not in the model \(1\): dense/kernel"):
    ckpts.restore_params(6, some)
  np.testing.assert_array_equal(ckpts.restore_params(6, some, partial=True)["dense"]["bias"],
                                np.ones(4))
