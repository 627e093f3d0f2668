"""Checkpoints (Orbax): the train state, sharded as it is on the mesh, plus a JSON record of
the run (config, data-pipeline position, answer set and protocol, validation metrics).

Saves are asynchronous and atomic: Orbax writes a step into a temporary folder and renames it
when complete, so a process killed at any moment leaves either the whole step or a temporary
folder that is never read (and is removed at the next start). The last `keep` scheduled saves
are kept (a stop's extra save only while it is the latest step: it does not push a scheduled
one out), plus the best on validation (highest `val_accuracy`, or lowest `val_loss`; the
later of equal ones), as the steps' run records say, so a resumed run keeps the best step
saved before it stopped. Restoring takes the shardings of the current mesh, so a checkpoint
written on 8 devices restores onto 1.

A step whose files were damaged after it was written (a truncated copy, a full disk) is an
`UnreadableCheckpoint` naming the step and what to do; nothing is deleted automatically. A
save that fails while it is written (a full disk) is a `CheckpointNotWritten` naming the step,
the reason and the step to resume from. A restore onto a model whose parameters differ from
the saved ones names the parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from medvqa_jax.errors import first_line

log = logging.getLogger(__name__)


class _ReadOnlyNotices(logging.Filter):
  """Drops the two warnings Orbax logs on opening a manager read-only, as evaluation and
  prediction do on purpose (they cluttered each command's output)."""
  NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and isinstance(record.msg, str)
                and record.msg.startswith(self.NOTICES))


_READ_ONLY_NOTICES = _ReadOnlyNotices()

TOKENIZER = "tokenizer"  # A run's copy of its tokenizer, in its work folder.


class UnreadableCheckpoint(ValueError):
  """A checkpoint step whose files cannot be read."""


class CheckpointNotWritten(ValueError):
  """A save that failed (a full disk, a quota, a lost mount): the steps saved before it are
  intact, and its temporary folder is removed at the next start."""


# TensorStore names the operating system's error by its number.
_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


class OptimizerChanged(ValueError):
  """A resume whose optimizer keeps another state than the checkpoint's."""


# What reading damaged checkpoint files raises (TensorStore's errors are ValueErrors, a cut
# JSON record a JSONDecodeError, a missing file an OSError).
_READ_ERRORS = (ValueError, OSError, KeyError, TypeError)


def _read_error(e: BaseException | None) -> BaseException | None:
  """The read error (`_READ_ERRORS`) that `e` is or was raised from, or None. Orbax re-raises
  TensorStore's error on a cut array file as a plain Exception from it."""
  while e is not None and not isinstance(e, _READ_ERRORS):
    e = e.__cause__
  return e


def _bytes_to_write(state) -> int:
  """The bytes of `state` this host writes: one replica of each of its shards."""
  total = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
    else:
      total += np.asarray(leaf).nbytes
  return total


_ABANDONED_READ = "_read_array_index_and_device_put"  # Orbax's read of one array's shard,
_ABANDONED_ERROR = "Encountered error while reading array index"  # and what it raises.


class _AbandonedReads(logging.Filter):
  """When a restore fails to read an array, Orbax leaves the reads of the others behind.
  Closed by the garbage collector, each raises (it turns the GeneratorExit into an Exception
  holding its TensorStore spec); TensorStore's callbacks for them find the restore's event
  loop closed ("Event loop is closed"); and asyncio logs the gathering future's exception as
  never retrieved. Up to tens of thousands of lines of tracebacks, most of them printed after
  the error that says what is wrong, whenever the collector runs and at exit.

  `install()` (for the length of a restore; False if in place already, or with
  MEDVQA_TRACEBACK=1, which keeps them all) drops those from sys.unraisablehook, passing the
  others on to the hook it replaced, and from the "asyncio" logger. A restore that fails
  leaves it in place for the rest of the process; one that succeeds `remove()`s it. (A failed
  save's tracebacks, logged by Orbax's threads, are the commands' to drop: launch/common.py's
  _OrbaxTracebacks; these come from any caller of a restore, a notebook's too.)"""

  def __init__(self):
    super().__init__()
    self.previous = None

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and str(error).startswith(_ABANDONED_ERROR))

  def unraisable(self, u) -> None:
    if getattr(u.object, "__name__", None) == _ABANDONED_READ or (
        u.object is None and isinstance(u.exc_value, RuntimeError)
        and str(u.exc_value) == "Event loop is closed"):
      return
    self.previous(u)

  def install(self) -> bool:
    if os.environ.get("MEDVQA_TRACEBACK") or sys.unraisablehook == self.unraisable:
      return False
    self.previous, sys.unraisablehook = sys.unraisablehook, self.unraisable
    logging.getLogger("asyncio").addFilter(self)
    return True

  def remove(self) -> None:
    if sys.unraisablehook == self.unraisable:
      sys.unraisablehook = self.previous
    logging.getLogger("asyncio").removeFilter(self)


_ABANDONED_READS = _AbandonedReads()


def _size(n: int) -> str:
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# Config fields added after runs were recorded, each with the value such a run had in effect:
# a record without one reads as having that value (an evaluation can then set it, and a
# resumed run does not list it as changed).
ADDED_FIELDS = {"model.rank_score": "likelihood", "train.deterministic": False}


def recorded_config(saved_json: str) -> dict:
  """A run record's config (its JSON), with the fields added since it was recorded filled in
  as the run had them (ADDED_FIELDS)."""
  config = json.loads(saved_json)
  for field, value in ADDED_FIELDS.items():
    part, name = field.split(".")
    if isinstance(config.get(part), dict):
      config[part].setdefault(name, value)
  return config


def run_tokenizer(workdir, text_cfg, record: dict | None = None):
  """The tokenizer saved in a run's work folder (None for a run from before it was saved),
  checked against the fingerprint in the run's `record` where it has one: a copy whose files
  were lost or changed would read other token ids, silently."""
  from medvqa_jax.data import tokenizer as tokenizer_lib
  folder = Path(workdir) / TOKENIZER
  if not folder.is_dir():
    return None
  try:
    tokenizer = tokenizer_lib.Tokenizer.from_folder(folder, text_cfg.max_len)
  except (ValueError, FileNotFoundError) as e:  # (A FileNotFoundError: no vocabulary there.)
    raise ValueError(f"{e}: the run's copy of its tokenizer is damaged; copy its files again "
                     "from where the run was made") from None
  recorded = (record or {}).get("tokenizer")
  found = tokenizer.fingerprint() if recorded else None
  if recorded and found != recorded:
    raise ValueError(
        f"{folder}: this is not the tokenizer the run was trained with (its fingerprint is "
        f"{found}, the run recorded {recorded}): its files were changed or "
        f"lost (it holds {sorted(p.name for p in folder.iterdir())}); copy them again from "
        "where the run was made")
  return tokenizer


def _selection(metrics: dict) -> float:
  if "val_accuracy" in metrics:
    return float(metrics["val_accuracy"])
  return -float(metrics["val_loss"])


def validated(metrics: dict | None) -> bool:
  """Whether a step's validation metrics (its run record's "val") can choose it as the best:
  they have the selection metric, and it is finite (a diverged loss is not)."""
  return bool(metrics) and ("val_accuracy" in metrics or "val_loss" in metrics) and \
      math.isfinite(_selection(metrics))


class _KeepBest:
  """Orbax's preservation policy for the best step on validation. It reads the run records,
  not Orbax's own per-step metrics: those are written only under Orbax's `best_fn`, and
  Orbax's metric policy counts a step without them as having no metric, so after a restart it
  deleted the best step saved before."""

  def __init__(self):
    self.step, self.value = None, None
    self.unread: set[int] = set()  # Steps whose record could not be read: kept too.
    self.stops: set[int] = set()  # Stops' saves, found by `Checkpoints._scan`.

  def offer(self, step: int, metrics: dict | None):
    """A step with validation metrics; a later step wins ties. A NaN or infinite value
    (a diverged validation loss) is never the best: it would compare false with every
    later value and stay chosen."""
    if validated(metrics):
      value = _selection(metrics)
      if self.value is None or value >= self.value:
        self.step, self.value = step, value

  def should_preserve(self, checkpoints, *, context=None):
    return [info.step == self.step or info.step in self.unread for info in checkpoints]


class _KeepLatest:
  """Orbax's preservation policy for the last `keep` scheduled saves and the latest step. A
  stop's extra save (`stops`) is kept while it is the latest, where a resume starts; counted
  among the last `keep`, it pushed out a scheduled (validated) step that the uninterrupted run
  keeps, and stayed after the resumed run saved past it."""

  def __init__(self, keep: int):
    self.keep = max(keep, 1)
    self.stops: set[int] = set()

  def should_preserve(self, checkpoints, *, context=None):
    steps = [info.step for info in checkpoints]
    kept = set(sorted(s for s in steps if s not in self.stops)[-self.keep:])
    kept.add(max(steps, default=None))
    return [s in kept for s in steps]


def _restore_args(abstract, partial: bool = False):
  """Restores the arrays of `abstract` (ShapeDtypeStructs with shardings); with `partial`,
  only those (the checkpoint may hold more)."""
  return ocp.args.PyTreeRestore(item=abstract, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, except that it does not ask JAX whether the preemption sync point is
  reached. Orbax asks with the saved step in every save and, on process 0, in the thread that
  finishes an asynchronous save, some steps later. JAX's agreement on the step at which every
  process stops (`preemption.reached`, asked by the loop at every step) starts from each
  process's last step asked: one set back by a save finishing just as a SIGTERM came could
  have that process train on past the agreed step while the others stopped to save, each
  waiting for the others until a timeout. Saves are forced here (`force=True`), so Orbax used
  the answer for its statistics only."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpoints:
  """The checkpoints of one run, in `directory`."""

  def __init__(self, directory, keep: int = 2, read_only: bool = False):
    self.directory = Path(directory).absolute()
    self._best, self._latest = _KeepBest(), _KeepLatest(keep)
    self._writing: int | None = None  # The step whose asynchronous save may be running.
    # The saved state's metadata by step (names, shapes, dtypes), read once: Orbax reads it
    # array by array (about a second for the tiny test model on a CPU), and a restore looks
    # at the parameters and the optimizer state in turn.
    self._metadata: dict[int, dict] = {}
    preservation = policies.AnyPreservationPolicy([self._latest, self._best])
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoint folder {self.directory}")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, args in (("state", ocp.args.PyTreeSave), ("state", ocp.args.PyTreeRestore),
                       ("run", ocp.args.JsonSave), ("run", ocp.args.JsonRestore)):
      registry.add(item, args)
    absl_log = logging.getLogger("absl")  # Orbax logs through absl.
    if read_only:
      absl_log.addFilter(_READ_ONLY_NOTICES)
    try:
      options = ocp.CheckpointManagerOptions(
          preservation_policy=preservation, create=not read_only, read_only=read_only,
          cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
      self.manager = _Manager(self.directory, options=options, handler_registry=registry)
    finally:
      absl_log.removeFilter(_READ_ONLY_NOTICES)
    if not read_only:  # The best step saved so far, kept by the saves to come.
      scan = self._scan()
      self._best.step, self._best.value, self._best.unread = scan.step, scan.value, scan.unread
      self._latest.stops = scan.stops

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, run: dict, metrics: dict | None = None, stop: bool = False):
    """Starts an asynchronous save of `state` and the JSON-able `run` record. A save that
    fails is reported (CheckpointNotWritten) here at the next save, or by `wait`/`close`.
    stop: the save is a stop's, off the schedule (its record says so): kept only while it is
    the latest step, not among the last `keep`."""
    self.wait()  # Orbax waits for the last save too: its failure is named as that step's.
    self._check_room(step, state)
    if stop:
      run = {**run, "stop": True}
      self._latest.stops.add(step)
    # Before: the save decides what the new step replaces.
    self._best.offer(step, metrics)
    self._writing = step
    self._metadata.pop(step, None)
    with self._writes(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                      run=ocp.args.JsonSave(run)),
                        metrics=metrics, force=True)

  def wait(self):
    with self._writes(self._writing):
      self.manager.wait_until_finished()
    self._writing = None

  def _check_room(self, step: int, state) -> None:
    """Refuses, before writing, a save the disk has clearly no room for (less free space than
    half this host's share of the state: Orbax compresses, by about 1.4x on random float32),
    so the run stops there, not at the next save, and without Orbax's write errors from its
    background threads. All hosts refuse if one does (each writes its own shards)."""
    need = _bytes_to_write(state)
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:  # Nothing to tell; the save itself reports what fails.
      free = None
    short = free is not None and free < need // 2
    if jax.process_count() > 1:  # Every host takes part, whatever it found.
      short = bool(np.any(multihost_utils.process_allgather(np.int32(short))))
    if short:
      raise self._not_written(
          step, f"{_size(free)} free on its disk, for a state of {_size(need)}"
          if free is not None and free < need // 2 else "another host's disk is full")

  def _not_written(self, step: int, why: str) -> CheckpointNotWritten:
    saved = self.steps()
    return CheckpointNotWritten(
        f"checkpoint step {step} could not be written in {self.directory} ({why}). The "
        f"steps saved before it are intact ({saved or 'none'}): free space, or move the run "
        "folder, and run the same command again to resume from "
        + (f"step {saved[-1]}" if saved else "the start"))

  @contextlib.contextmanager
  def _writes(self, step: int | None):
    """The failure of `step`'s save (raised by Orbax from its background threads, with
    TensorStore's message) as a CheckpointNotWritten that names the step, the reason and
    what to do."""
    try:
      yield
    except Exception as e:
      text = str(e)
      code = _OS_ERROR.search(text)
      # Only what writing raised (an OS error, or TensorStore's naming one): anything else (a
      # record that is not JSON, the hosts out of step) keeps its own message and traceback.
      if step is None or not (isinstance(e, OSError) or code):
        raise
      self._writing = None
      why = (os.strerror(int(code.group(1))) if code
             else first_line(e) or type(e).__name__)
      raise self._not_written(step, why) from e

  def _unreadable(self, step: int, e: Exception) -> UnreadableCheckpoint:
    why = first_line(e)
    if self._deleted(step):  # Not damaged: do not advise deleting anything.
      self.manager.reload()
      return UnreadableCheckpoint(
          f"checkpoint step {step} in {self.directory} was deleted while it was read "
          f"({type(e).__name__}: {why}): a training running in this folder deletes its "
          f"older steps as it saves (train.keep). Read a step it keeps: the best on "
          f"validation or the latest (it now has {self.steps() or 'none'})")
    others = [s for s in self.steps() if s != step]
    return UnreadableCheckpoint(
        f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
        f"{why}). Its files are damaged or incomplete: delete {self.directory / str(step)} "
        f"to go on without it (a resumed run goes on from the latest step left), or read "
        f"another with eval.py's or predict.py's --step (the others: {others or 'none'})")

  def _deleted(self, step: int) -> bool:
    """Whether `step`'s folder is gone, or going within a second (Orbax removing it)."""
    for _ in range(3):
      if not (self.directory / str(step)).exists():
        return True
      time.sleep(0.5)
    return False

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Read errors of `step`'s files (those Orbax re-raises too) as an UnreadableCheckpoint."""
    quiet = _ABANDONED_READS.install()  # From the start: some come before the error.
    try:
      yield
    except Exception as e:
      if (cause := _read_error(e)) is None:
        raise
      raise self._unreadable(step, cause) from e
    if quiet:  # Read whole: nothing abandoned.
      _ABANDONED_READS.remove()

  def _restore(self, step: int, **args) -> dict:
    with self._reading(step):
      return self.manager.restore(step, args=ocp.args.Composite(**args))

  def run_record(self, step: int) -> dict:
    return self._restore(step, run=ocp.args.JsonRestore())["run"]

  def _scan(self) -> _KeepBest:
    """The best validation metric in the run records on disk, and the stops' saves among
    them (`stops`). Steps whose record cannot be read are passed over, with a warning, and
    listed in `unread` (the saves to come keep them: nothing is deleted automatically, and
    one of them may have been the best)."""
    best = _KeepBest()
    for step in self.steps():
      try:
        record = self.run_record(step)
        best.offer(step, record.get("val"))
        if record.get("stop"):
          best.stops.add(step)
      except UnreadableCheckpoint as e:
        best.unread.add(step)
        log.warning("passed over in choosing the best step (and kept): %s", e)
    return best

  def best_step(self) -> int | None:
    """The step with the best validation metric; if none has one, the latest step whose
    record could be read (the latest itself when none could: its read then says why)."""
    best = self._scan()
    if best.step is not None:
      return best.step
    readable = [s for s in self.steps() if s not in best.unread]
    return readable[-1] if readable else self.latest_step()

  def _saved(self, step: int, part: str):
    if step not in self._metadata:
      with self._reading(step):
        self._metadata[step] = self.manager.metadata(step).item_metadata["state"]
    return self._metadata[step][part]

  def _differences(self, step: int, part: str, wanted, partial: bool = False) -> str:
    """What differs, by name and shape, between the `part` of the state saved at `step` and
    `wanted` ("" if nothing); with `partial`, the checkpoint may hold more."""
    from medvqa_jax.models import state_dict
    saved = state_dict.flatten(self._saved(step, part))
    wanted = state_dict.flatten(wanted)
    missing = sorted(wanted.keys() - saved.keys())
    extra = [] if partial else sorted(saved.keys() - wanted.keys())
    shapes = sorted(f"{k} {tuple(saved[k].shape)} saved, {tuple(wanted[k].shape)} now"
                    for k in wanted.keys() & saved.keys()
                    if tuple(saved[k].shape) != tuple(wanted[k].shape))
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("not saved", missing), ("saved but not in the model", extra),
                            ("other shapes", shapes)) if keys)

  def check_params(self, step: int, abstract_params, partial: bool = False):
    """Refuses, naming them, parameters whose names or shapes differ between `step` and the
    model about to receive them (with `partial`, the checkpoint may hold more)."""
    differences = self._differences(step, "params", abstract_params, partial)
    if differences:
      raise ValueError(
          f"checkpoint step {step} in {self.directory} holds another model than the config "
          f"describes: {differences}. A run folder resumes and evaluates only with the "
          "model it was trained with: drop the --config overrides that change the model (or "
          "use a new train.workdir)")

  def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
    """(state, run record) of `step`, placed as the ShapeDtypeStructs of `abstract_state`
    (with their shardings) say."""
    self.check_params(step, abstract_state["params"])
    # Freezing a part drops its moments, which a restore may leave unread: only what the
    # optimizer needs and the checkpoint lacks is refused.
    differences = ("opt_state" in abstract_state
                   and self._differences(step, "opt_state", abstract_state["opt_state"],
                                         partial=True))
    if differences:
      raise OptimizerChanged(
          f"checkpoint step {step} in {self.directory} holds the state of another optimizer "
          f"than the config's ({differences}). "
          "The optim settings that shape it (optim.grad_clip set or not, the optim.lr_mults "
          "groups and their multipliers) cannot change when a run resumes: set them back, or "
          "start a new train.workdir from this run's parameters with "
          "--config.train.init_from")
    out = self._restore(step, state=_restore_args(abstract_state), run=ocp.args.JsonRestore())
    return out["state"], out["run"]

  def saved_params(self, step: int, sharding=None) -> dict:
    """ShapeDtypeStructs of the parameters saved at `step`, placed by `sharding` (default:
    this process's first device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = self._saved(step, "params")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                       sharding=sharding), dict(meta))

  def restore_params(self, step: int, abstract_params, partial: bool = False) -> dict:
    """Only the parameters of `step` (no optimizer state), placed like `abstract_params`; with
    `partial`, those of them that the checkpoint holds among others."""
    self.check_params(step, abstract_params, partial=partial)
    out = self._restore(step, state=_restore_args({"params": abstract_params}, partial=True))
    return out["state"]["params"]

  def close(self):
    self.wait()
    self.manager.close()


def resolve(path) -> tuple[Path, int | None]:
  """A checkpoint path to (checkpoints folder, step): a run's workdir, its `checkpoints`
  folder, or one step folder inside it (step None: the caller picks)."""
  path = Path(path).absolute()
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and (path / "state").exists():
    return path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}: " + (
        "a file, not a run's folder" if path.exists() else "no such folder"))
  if (path / TOKENIZER).is_dir() or (path / "metrics.jsonl").exists():  # A run's work folder.
    raise FileNotFoundError(f"{path} has no checkpoints/ folder: the run saved no checkpoint "
                            "(yet)")
  return path, None
