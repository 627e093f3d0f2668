"""Checkpoints whose files were damaged after they were written, and restores onto another
model: clear errors naming the step and what to do, nothing deleted."""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
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


def test_saving_leaves_the_agreement_on_the_step_to_stop_at_to_the_loop(tmp_path, monkeypatch):
  """JAX agrees on the step at which every process of a run stops after a SIGTERM from each
  process's last step asked (`preemption.reached`, asked by the loop at every step). Orbax
  asked too, with the saved step, in the save and in the thread finishing it steps later:
  a SIGTERM then could have that process miss the agreed step and train on alone while the
  others waited for it to save. Saving asks nothing."""
  from jax.experimental import multihost_utils
  asked = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or False)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints")
  for step in (2, 4):
    ckpts.save(step, state(), {"step": step})
  ckpts.close()
  assert ckpts.steps() == [2, 4] and asked == []


def largest_file(path):
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_intact_steps_restore(folder):
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  restored, run = ckpts.restore(6, abstract(state()))
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"],
                                state()["params"]["dense"]["kernel"])
  assert run["step"] == 6 and ckpts.best_step() == 4


def test_opening_read_only_says_nothing_of_it(folder, caplog):
  # Orbax warns that a read-only manager saves nothing and that its folder is read-only: two
  # lines on every eval.py and predict.py, which open it so on purpose. Other warnings pass.
  import logging
  with caplog.at_level("WARNING"):
    ckpt_lib.Checkpoints(folder, read_only=True).close()
    logging.getLogger("absl").warning("Given directory is read only, said after")
  assert "read_only=True" not in caplog.text
  assert caplog.text.count("Given directory is read only") == 1  # Only the line after.


def test_a_step_deleted_while_read_is_not_called_damaged(folder):
  """An evaluation of a run still training: its saves delete older steps, one of them maybe
  while it is read. That was reported as damaged files, with advice to delete the step."""
  import shutil
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  assert ckpts.steps() == [2, 4, 6]
  shutil.rmtree(folder / "2")  # The training's keep policy, after the steps were listed.
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match=r"checkpoint step 2 in \S+ was "
                     r"deleted while it was read \(.*\): a training running in this folder "
                     r"deletes its older steps as it saves \(train.keep\). Read a step it "
                     r"keeps: the best on validation or the latest \(it now has \[4, 6\]\)"):
    ckpts.restore(2, abstract(state()))
  ckpts.close()


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


# Orbax leaves the failed read's sibling coroutines to the garbage collector, which reports
# them (GeneratorExit) as unraisable, here or in a later test: pyproject.toml filters that.
def test_a_cut_array_file_names_the_step_and_what_to_do(tmp_path):
  """An array's data file cut short (the state's largest file is its JSON metadata when the
  arrays are small): Orbax re-raises TensorStore's error as a plain Exception, which went
  out as a traceback."""
  folder = tmp_path / "checkpoints"
  big = lambda: {"params": {"w": jnp.arange(4096, dtype=jnp.float32)}, "step": jnp.int32(0)}
  ckpts = ckpt_lib.Checkpoints(folder, keep=5)
  for step in (2, 6):
    ckpts.save(step, big(), {"step": step, "val": {}})
  ckpts.close()
  victim = largest_file(folder / "6" / "state")
  assert victim.parent.name == "d" and victim.stat().st_size > 4096 * 2  # The array's data.
  victim.write_bytes(victim.read_bytes()[:100])
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  with pytest.raises(ckpt_lib.UnreadableCheckpoint) as e:
    ckpts.restore(6, abstract(big()))
  message = str(e.value)
  assert "step 6" in message and f"delete {folder / '6'}" in message and "[2]" in message
  assert "(ValueError: " in message  # TensorStore's own account, not Orbax's wrapper.
  np.testing.assert_array_equal(ckpts.restore(2, abstract(big()))[0]["params"]["w"],
                                big()["params"]["w"])


def test_a_failed_restore_silences_its_abandoned_reads_and_nothing_else(folder, monkeypatch):
  """After a failed array read, Orbax's abandoned reads of the other arrays printed up to tens
  of thousands of lines of tracebacks around the one-line error (as unraisable exceptions and
  through asyncio's logger). The restore that fails leaves a filter of exactly those in
  place; the others still reach the hook and the logger; a restore that succeeds leaves both
  as they were."""
  import gc
  import types
  gc.collect()  # Earlier tests' garbage, whose finalizers may raise: not this test's to see.
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  monkeypatch.delenv("MEDVQA_TRACEBACK", raising=False)
  asyncio_log = logging.getLogger("asyncio")
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  ckpts.restore(6, abstract(state()))
  assert sys.unraisablehook != ckpt_lib._ABANDONED_READS.unraisable
  assert ckpt_lib._ABANDONED_READS not in asyncio_log.filters
  victim = largest_file(folder / "6" / "state")
  victim.write_bytes(victim.read_bytes()[:100])
  try:
    with pytest.raises(ckpt_lib.UnreadableCheckpoint, match="step 6"):
      ckpts.restore(6, abstract(state()))
    ckpts.restore(4, abstract(state()))  # A later read that succeeds keeps the filter.
    assert sys.unraisablehook == ckpt_lib._ABANDONED_READS.unraisable

    class _Pending:
      def __await__(self):
        yield

    async def _read_array_index_and_device_put():  # Orbax's read, abandoned as it is.
      try:
        await _Pending()
      except BaseException as e:
        raise Exception("Encountered error while reading array index: (slice(0, 4, 1),)") from e

    read = _read_array_index_and_device_put()
    read.send(None)
    del read
    gc.collect()  # Its close raises: an unraisable exception, dropped.
    assert not [e for e in seen if str(e).startswith("Encountered error while reading")]
    hook = sys.unraisablehook
    unraisable = lambda error, obj=None: types.SimpleNamespace(
        exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=obj)
    given = [RuntimeError("Event loop is closed"), RuntimeError("Event loop is closed"),
             RuntimeError("another loop's trouble"), ValueError("someone else's")]
    for error, obj in zip(given, (None, "a callback", None, None)):
      hook(unraisable(error, obj))
    # Those given here (the real reads' own may reach the hook before the filter is in place).
    assert [e for e in seen if any(e is g for g in given)] == given[1:]
    record = lambda error: logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                             "Future exception was never retrieved", None,
                                             (type(error), error, None))
    assert not asyncio_log.filter(record(Exception(
        "Encountered error while reading array index: (slice(0, 4, 1),)")))
    assert asyncio_log.filter(record(RuntimeError("another task's")))
  finally:
    ckpt_lib._ABANDONED_READS.remove()
  # With MEDVQA_TRACEBACK=1 nothing is filtered.
  monkeypatch.setenv("MEDVQA_TRACEBACK", "1")
  with pytest.raises(ckpt_lib.UnreadableCheckpoint):
    ckpts.restore(6, abstract(state()))
  assert sys.unraisablehook != ckpt_lib._ABANDONED_READS.unraisable


def test_damaged_run_record_is_passed_over_in_choosing_the_best(folder, caplog):
  record = folder / "4" / "run" / "metadata"  # The JSON record.
  record.write_text(record.read_text()[:5])
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match="step 4"):
    ckpts.run_record(4)
  with caplog.at_level(logging.WARNING):
    assert ckpts.best_step() == 6  # 4 (the best) cannot be read; then 6 (0.6) over 2 (0.5).
  assert "passed over" in caplog.text and "step 4" in caplog.text


def test_without_validation_the_latest_readable_step_is_the_best(tmp_path):
  """No step with a validation metric: the latest step stands in for the best; one whose
  record cannot be read is passed over there too (it was chosen, and failed)."""
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=5)
  for step in (2, 4):
    ckpts.save(step, state(), {"step": step, "val": {}})
  ckpts.close()
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", read_only=True)
  assert ckpts.best_step() == 4
  record = tmp_path / "checkpoints" / "4" / "run" / "metadata"
  record.write_text(record.read_text()[:5])
  assert ckpts.best_step() == 2
  (tmp_path / "checkpoints" / "2" / "run" / "metadata").write_text("{")
  assert ckpts.best_step() == 4  # None readable: the latest, whose read then says why.


def test_a_step_whose_record_is_damaged_is_not_deleted_by_the_saves_to_come(folder):
  """Passed over in choosing the best, a step whose record cannot be read (here the best,
  4) is still kept by a resumed run's saves, whatever `keep` says: its parameters may be
  intact, and nothing is deleted automatically."""
  record = folder / "4" / "run" / "metadata"
  record.write_text(record.read_text()[:5])
  ckpts = ckpt_lib.Checkpoints(folder, keep=1)
  for step in (8, 10):
    val = {"val_accuracy": 0.1}
    ckpts.save(step, state(), {"step": step, "val": val}, metrics=val)
  ckpts.close()
  # 6 (0.6), the best readable, and 10, the latest, are kept by the policy; 2 and 8 go.
  assert ckpt_lib.Checkpoints(folder, read_only=True).steps() == [4, 6, 10]


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


@pytest.mark.parametrize("metric,values", [
    ("val_accuracy", {1: 0.9, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.2, 6: 0.95, 7: 0.1}),
    ("val_loss", {1: 0.1, 2: 0.5, 3: 0.6, 4: 0.7, 5: 0.8, 6: 0.05, 7: 0.9}),
])
def test_the_best_step_survives_a_restart(tmp_path, metric, values):
  # A resumed run keeps the best step saved before it stopped (it used to delete it at its
  # first saves: Orbax's metric policy forgot the metrics of earlier processes' steps, and
  # the test would then have been evaluated on a worse step).
  def save(ckpts, steps):
    for step in steps:
      val = {metric: values[step]}
      ckpts.save(step, state(), {"step": step, "val": val}, metrics=val)
      ckpts.wait()

  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=1)
  save(ckpts, (1, 2, 3))
  assert ckpts.steps() == [1, 3]
  ckpts.close()
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=1)  # The resumed run.
  save(ckpts, (4, 5))
  assert ckpts.steps() == [1, 5] and ckpts.best_step() == 1
  save(ckpts, (6,))  # A better step replaces it at once.
  assert ckpts.steps() == [6] and ckpts.best_step() == 6
  save(ckpts, (7,))
  assert ckpts.steps() == [6, 7] and ckpts.best_step() == 6
  ckpts.close()
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=1)
  # A save without validation (a stop request's) keeps it too.
  ckpts.save(9, state(), {"step": 9, "val": {}}, metrics=None)
  ckpts.close()
  assert ckpt_lib.Checkpoints(tmp_path / "checkpoints", read_only=True).steps() == [6, 9]


def test_a_stops_save_does_not_push_out_a_scheduled_step(tmp_path):
  """keep=2, saves every 4 steps, validation every 2, a stop at step 5: the stop's save is
  kept while it is the latest, where the resume starts, and the resumed run ends with the
  steps an uninterrupted one keeps, [8, 12] (the stop's save took a place among the last 2:
  validated step 8 was deleted, and step 9 stayed, never to be chosen)."""
  def save(ckpts, step, acc=None, stop=False):
    val = {"val_accuracy": acc} if acc is not None else {}
    ckpts.save(step, state(), {"step": step, "val": val}, metrics=val or None, stop=stop)
    ckpts.wait()

  folder = tmp_path / "checkpoints"
  ckpts = ckpt_lib.Checkpoints(folder, keep=2)
  save(ckpts, 4, 0.5)
  save(ckpts, 8, 0.2)
  save(ckpts, 9, stop=True)
  assert ckpts.steps() == [4, 8, 9] and ckpts.best_step() == 4
  ckpts.close()
  assert ckpt_lib.Checkpoints(folder, read_only=True).run_record(9)["stop"] is True
  ckpts = ckpt_lib.Checkpoints(folder, keep=2)  # The resumed run: its record says stop.
  save(ckpts, 12, 0.1)
  assert ckpts.steps() == [4, 8, 12]  # The last 2 scheduled, and the best.
  save(ckpts, 13, stop=True)
  save(ckpts, 14, stop=True)  # A stop at once after resuming: the latest is kept.
  assert ckpts.steps() == [4, 8, 12, 14]
  save(ckpts, 16, 0.9)
  assert ckpts.steps() == [12, 16] and ckpts.best_step() == 16
  ckpts.close()


def test_resuming_under_an_optimizer_of_another_state_is_refused_by_name(tmp_path,
                                                                         monkeypatch):
  # grad_clip on, or another multiplier for a group: the optimizer keeps another state.
  # Refused as such, not reported as damaged files (whose advice is to delete the step).
  # Freezing a group drops its moments only: that still restores. The saved state's
  # metadata (which the checks of the parameters and of the optimizer state both read) is
  # read from the files once per step.
  import ml_collections
  from medvqa_jax.train import loop, optim, sharding
  from medvqa_jax.train import step as step_lib
  params = {"image": {"w": jnp.ones(4)}, "text": {"w": jnp.ones(4)}}
  mesh = sharding.make_mesh(1)

  def setup(**changes):
    cfg = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.98,
                                         warmup_fraction=0.1, total_steps=10, lr_mults=(),
                                         grad_clip=None))
    cfg.update(changes)
    tx = optim.make(cfg, params)
    return tx, step_lib.state_shardings(mesh, params, tx)

  tx, shardings = setup()
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints")
  ckpts.save(1, step_lib.init_state(params, tx, shardings), {"step": 1})
  ckpts.wait()
  read = helpers.count_calls(monkeypatch, ckpts.manager, "metadata")
  restored, _ = ckpts.restore(1, loop.abstract_state(params, tx, shardings))
  assert int(restored["step"]) == 0
  for changes in ({"grad_clip": 1.0}, {"lr_mults": (("image/.*", 0.5),)}):
    with pytest.raises(ckpt_lib.OptimizerChanged,
                       match=r"checkpoint step 1 .* holds the state of another optimizer than "
                             r"the config's \(not saved \(\d+\): .*optim.grad_clip"):
      ckpts.restore(1, loop.abstract_state(params, *setup(**changes)))
  frozen = setup(lr_mults=(("image/.*", 0.0),))
  restored, _ = ckpts.restore(1, loop.abstract_state(params, *frozen))
  np.testing.assert_array_equal(restored["params"]["image"]["w"], np.ones(4))
  assert [args for args, _ in read] == [(1,)]
  ckpts.save(2, restored, {"step": 2})
  ckpts.wait()
  assert ckpts.saved_params(2)["text"]["w"].shape == (4,) and len(read) == 2
  ckpts.close()
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_a_diverged_validation_is_never_the_best_step(tmp_path):
  # A NaN first validation loss once stayed the best for good: every later value compares
  # false with NaN. eval.py and init_from would then have taken the diverged step.
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=1)
  for step, loss in ((1, float("nan")), (2, 2.0), (3, float("inf")), (4, 1.5), (5, 3.0)):
    val = {"val_loss": loss}
    ckpts.save(step, state(), {"step": step, "val": val}, metrics=val)
    ckpts.wait()
  assert ckpts.best_step() == 4 and ckpts.steps() == [4, 5]
  ckpts.close()
  assert ckpt_lib.Checkpoints(tmp_path / "checkpoints", read_only=True).best_step() == 4


@pytest.mark.parametrize("metric,values", [("val_accuracy", (0.5, 0.7, 0.7)),
                                           ("val_loss", (0.9, 0.4, 0.4))])
def test_of_equal_validations_the_later_step_is_the_best(tmp_path, metric, values):
  """A tie goes to the later step (the one trained longer), as the docstring of the policy
  says; with no validation at all, the best is the latest step."""
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=5)
  for step, value in zip((1, 2, 3), values):
    val = {metric: value}
    ckpts.save(step, state(), {"step": step, "val": val}, metrics=val)
    ckpts.wait()
  assert ckpts.best_step() == 3
  ckpts.close()
  unvalidated = ckpt_lib.Checkpoints(tmp_path / "other", keep=5)
  for step in (2, 4):
    unvalidated.save(step, state(), {"step": step, "val": {}}, metrics=None)
    unvalidated.wait()
  assert unvalidated.best_step() == 4
  unvalidated.close()


def test_a_save_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch):
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=5)
  ckpts.save(2, state(), {"step": 2})
  ckpts.wait()
  big = state(width=1 << 16)  # 0.75 MiB of float32 parameters.
  need = ckpt_lib._bytes_to_write(big)
  assert need == (3 + 1) * (1 << 16) * 4 + 4
  room = lambda free: lambda path: type("usage", (), {"free": free})()  # noqa: E731
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", room(need // 2 - 1))
  with pytest.raises(ckpt_lib.CheckpointNotWritten) as e:
    ckpts.save(4, big, {"step": 4})
  assert str(e.value).startswith(
      f"checkpoint step 4 could not be written in {tmp_path / 'checkpoints'} (0.5 MiB free "
      "on its disk, for a state of 1.0 MiB). The steps saved before it are intact ([2]): free "
      "space, or move the run folder, and run the same command again to resume from step 2")
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # Nothing begun.
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", room(need // 2))  # Compressed, it fits.
  ckpts.save(4, big, {"step": 4})
  ckpts.close()
  assert ckpt_lib.Checkpoints(tmp_path / "checkpoints", read_only=True).steps() == [2, 4]


_FAILING_SAVE = """
import resource, signal, sys
import jax
from medvqa_jax.train import checkpoint as ckpt_lib
ckpts = ckpt_lib.Checkpoints(sys.argv[1], keep=5)
ckpts.save(1, {"w": jax.numpy.ones(8)}, {"step": 1})
ckpts.wait()
# Files may not grow past 1 MiB from here (what a full disk does, without one to fill).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
ckpts.save(2, {"w": jax.random.normal(jax.random.key(0), (1 << 20,))}, {"step": 2})
try:
  ckpts.save(3, {"w": jax.numpy.ones(8)}, {"step": 3})
except ckpt_lib.CheckpointNotWritten as e:
  print("REPORTED:", e)
ckpts.close()
print("STEPS:", ckpts.steps())
"""


def test_a_save_that_fails_while_written_is_named_with_its_step_and_reason(tmp_path):
  """A write error in Orbax's background threads (a full disk; here a file-size limit) was
  raised at the next save as TensorStore's message, with hundreds of lines of tracebacks."""
  import subprocess
  import sys
  script = tmp_path / "save.py"
  script.write_text(_FAILING_SAVE)
  out = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoints")],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = out.stdout.split("REPORTED: ")[1].splitlines()[0]
  assert report == (
      f"checkpoint step 2 could not be written in {tmp_path / 'checkpoints'} (File too "
      "large). The steps saved before it are intact ([1]): free space, or move the run "
      "folder, and run the same command again to resume from step 1")
  assert "STEPS: [1]" in out.stdout  # Step 3 was not begun; step 2 left nothing readable.


def test_a_run_folder_without_checkpoints_is_named_as_such(tmp_path):
  """eval.py and predict.py on a run that saved nothing yet said "no complete checkpoint in"
  the run folder, as if it were a checkpoints folder."""
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(FileNotFoundError, match=rf"^{tmp_path} has no checkpoints/ folder: the "
                     r"run saved no checkpoint \(yet\)$"):
    ckpt_lib.resolve(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  assert ckpt_lib.resolve(tmp_path) == (tmp_path / "checkpoints", None)
  # A folder named by a number is a step's only if it holds one (a checkpoints folder kept
  # as "2025", a run folder named "7").
  (tmp_path / "2025").mkdir()
  assert ckpt_lib.resolve(tmp_path / "2025") == (tmp_path / "2025", None)
  (tmp_path / "7").mkdir()
  (tmp_path / "7" / "metrics.jsonl").write_text("")
  with pytest.raises(FileNotFoundError, match="7 has no checkpoints/ folder"):
    ckpt_lib.resolve(tmp_path / "7")
  # Killed in its first save: the folder that save left is named.
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir()
  from medvqa_jax.evaluate import run as run_lib
  with pytest.raises(FileNotFoundError, match=rf"^no complete checkpoint in {tmp_path}/"
                     r"checkpoints \(the save of 4 was cut short, leaving "
                     r"4.orbax-checkpoint-tmp: the run stopped before its first checkpoint"):
    run_lib.restore(tmp_path)


def test_only_write_failures_are_reported_as_checkpoints_not_written(tmp_path, monkeypatch):
  """Another failure of a save (hosts out of step, a bug) keeps its own message: it was told
  to free space. A disk whose free space cannot be read is no reason to refuse a save."""
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=5)

  def unreadable(path):
    raise OSError(5, "Input/output error")
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", unreadable)
  ckpts.save(2, state(), {"step": 2})

  def out_of_step():
    raise AssertionError("sync_global_devices name mismatch")
  monkeypatch.setattr(ckpts.manager, "wait_until_finished", out_of_step)
  with pytest.raises(AssertionError, match="name mismatch"):
    ckpts.wait()

  def disk_full():
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(ckpts.manager, "wait_until_finished", disk_full)
  with pytest.raises(ckpt_lib.CheckpointNotWritten, match=r"checkpoint step 2 could not be "
                     r"written in .* \(\[Errno 28\] No space left on device\)"):
    ckpts.wait()
  monkeypatch.undo()
  ckpts.close()
