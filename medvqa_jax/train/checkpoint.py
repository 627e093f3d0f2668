"""Checkpoints (Orbax): the train state, sharded as it is on the mesh, plus a JSON record of
the run (config, data-pipeline position, answer set and protocol, validation metrics).

Saves are asynchronous and atomic: Orbax writes a step into a temporary folder and renames it
when complete, so a process killed at any moment leaves either the whole step or a temporary
folder that is never read (and is removed at the next start). The last `keep` steps are kept,
plus the best on validation (highest `val_accuracy`, or lowest `val_loss`). Restoring takes
the shardings of the current mesh, so a checkpoint written on 8 devices restores onto 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer"  # A run's copy of its tokenizer, in its work folder.


def run_tokenizer(workdir, text_cfg):
  """The tokenizer saved in a run's work folder (None for a run from before it was saved)."""
  from medvqa_jax.data import tokenizer as tokenizer_lib
  folder = Path(workdir) / TOKENIZER
  return tokenizer_lib.Tokenizer.from_folder(folder, text_cfg.max_len) if folder.is_dir() \
      else None


def _selection(metrics: dict) -> float:
  if "val_accuracy" in metrics:
    return float(metrics["val_accuracy"])
  return -float(metrics["val_loss"])


def _restore_args(abstract, partial: bool = False):
  """Restores the arrays of `abstract` (ShapeDtypeStructs with shardings); with `partial`,
  only those (the checkpoint may hold more)."""
  return ocp.args.PyTreeRestore(item=abstract, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpoints:
  """The checkpoints of one run, in `directory`."""

  def __init__(self, directory, keep: int = 2, read_only: bool = False):
    self.directory = Path(directory).absolute()
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=max(keep, 1)),
        policies.BestN(get_metric_fn=_selection, n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoint folder {self.directory}")
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "run": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, run: dict, metrics: dict | None = None):
    """Starts an asynchronous save of `state` and the JSON-able `run` record."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    run=ocp.args.JsonSave(run)),
                      metrics=metrics, force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def run_record(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

  def best_step(self) -> int | None:
    """The step with the best validation metric (the latest step if none has one)."""
    best, best_value = None, None
    for step in self.steps():
      m = self.run_record(step).get("val") or {}
      if "val_accuracy" in m or "val_loss" in m:
        value = _selection(m)
        if best_value is None or value >= best_value:
          best, best_value = step, value
    return best if best is not None else self.latest_step()

  def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
    """(state, run record) of `step`, placed as the ShapeDtypeStructs of `abstract_state`
    (with their shardings) say."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(abstract_state), run=ocp.args.JsonRestore()))
    return out["state"], out["run"]

  def saved_params(self, step: int, sharding=None) -> dict:
    """ShapeDtypeStructs of the parameters saved at `step`, placed by `sharding` (default:
    this process's first device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = self.manager.item_metadata(step)["state"]["params"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                       sharding=sharding), dict(meta))

  def restore_params(self, step: int, abstract_params) -> dict:
    """Only the parameters of `step` (no optimizer state), placed like `abstract_params`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_args({"params": abstract_params}, partial=True)))
    return out["state"]["params"]

  def close(self):
    self.manager.wait_until_finished()
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
    raise FileNotFoundError(f"no checkpoint at {path}")
  return path, None
