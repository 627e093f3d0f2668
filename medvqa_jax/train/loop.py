"""The training loop: fine-tuning (a VQA dataset, `model.head` generative or classifier) or
pre-training (a caption corpus, `model.head="none"`), the same code on one CPU, one GPU or
every host of a pod.

  state born sharded -> [resume from the latest checkpoint] -> per step: this host's part of
  the global batch (copied to the devices `train.prefetch` steps ahead), the jitted sharded
  step, metrics (a step behind, so the device never waits for the host) -> validation every
  `eval_every`, a checkpoint every `save_every` and at the end -> fine-tuning: test
  evaluated once, on the best-on-validation checkpoint.
Pre-training validates on a held-out slice of its corpus (`evaluate/pretrain.py`).

A run restarted with the same command resumes from its latest complete checkpoint: the state,
the data position (batches are a function of the seed and the step) and the step's random key
(folded from the step) are those the uninterrupted run would have had, provided the data
are: a run whose training or validation examples, batch size or seed changed since (a
rebuilt dataset, another `val_fraction`, `batch_size` or `seed`) is refused. On another
device count it continues with a note: reductions then round otherwise, so its numbers
differ from the uninterrupted run's in the last bits. A NaN or
infinite loss or gradient norm stops the run (`Diverged`) before anything is saved after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax import files as files_lib
from medvqa_jax.data import pipeline
from medvqa_jax.data import splits as splits_lib
from medvqa_jax.data import tokenizer as tokenizer_lib
from medvqa_jax.evaluate import pretrain as pretrain_eval
from medvqa_jax.evaluate import vqa as vqa_eval
from medvqa_jax.models import amif, gca
from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import (determinism, distributed, notes, observe, optim, preemption,
                              sharding, teacher_feed, warm_start)
from medvqa_jax.train import step as step_lib

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
  """The loss became NaN or infinite."""


def workdir_of(config, workdir=None) -> Path:
  """The run's work folder, named (`check_named` refuses a config that names none)."""
  workdir = Path(workdir or config.train.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"the work folder {workdir} (train.workdir) is a file, not a folder")
  return workdir


def check_named(config, workdir=None) -> None:
  """Refuses, in one message, a config that leaves unset a folder or file the run needs: the
  work folder, the data folder, a new run's tower checkpoints (and the text tower's tokenizer
  where no checkpoint gives it), a pre-training run's teacher cache and teacher checkpoints.
  Refused one at a time, they were found a run at a time, the towers' after the dataset had
  been built (minutes for PathVQA). A run being resumed reads its towers and tokenizer from
  its own folder (the later checks still refuse what a resume lacks)."""
  need = []
  workdir = workdir or config.train.get("workdir")
  if not workdir:
    need.append("--config.train.workdir=/path/to/run (the work folder for checkpoints and "
                "logs)")
  if not config.data.get("dir"):
    need.append("--config.data.dir=/path (the folder the dataset is built in, or was)")
  teacher = config.model.head == "none" and config.get("teacher") is not None
  if teacher and config.teacher.get("mode") == "cache" and not config.teacher.get("cache"):
    need.append("--config.teacher.cache=FILE (built by `python launch/cache_teacher.py`; or "
                "--config.teacher.mode=online)")
  if not (workdir and (Path(workdir) / "checkpoints").is_dir()):
    towers = [("model.image", config.model.image), ("model.text", config.model.text)]
    if teacher and config.teacher.get("mode") in ("cache", "online"):
      towers += [("teacher.image", config.teacher.image), ("teacher.text", config.teacher.text)]
    for where, tower in towers:
      if tower.source != "init" and not tower.get("checkpoint"):
        need.append(f"--config.{where}.checkpoint=/path/to/folder (the {tower.kind} tower "
                    f"loads a {tower.source} checkpoint)")
      elif where.endswith(".text") and not (tower.get("tokenizer") or tower.get("checkpoint")):
        need.append(f"--config.{where}.tokenizer=/path (the text tower's tokenizer folder)")
  if need:
    raise ValueError("the config leaves unset what the run needs: set " + "; ".join(need))


def total_steps(config, num_train: int) -> int:
  """The run's length: train.epochs passes over `num_train` examples (an epoch is
  num_train // batch_size steps: each pass leaves out the remainder, other examples each
  time), or optim.total_steps. Both set (and not to the same length) is refused: one of them
  would be ignored; neither, too."""
  tc, steps = config.train, config.optim.get("total_steps")
  if not tc.get("epochs"):
    if not steps:
      raise ValueError("the run's length is not set: set --config.optim.total_steps (steps) "
                       "or --config.train.epochs (passes over the training set)")
    return steps
  by_epochs = tc.epochs * max(num_train // tc.batch_size, 1)
  if steps and steps != by_epochs:
    raise ValueError(
        f"train.epochs={tc.epochs} ({by_epochs} steps of {tc.batch_size}) and "
        f"optim.total_steps={steps} both set the run's length: count in steps with "
        f"--config.train.epochs=0, or in epochs with --config.optim.total_steps=0")
  return by_epochs


def abstract_state(model_shapes, tx, shardings) -> dict:
  shapes = {"params": model_shapes, "opt_state": jax.eval_shape(tx.init, model_shapes),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def to_global(tree, shardings):
  """Host arrays (the same on every host) to global arrays placed by `shardings`."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings)


def config_changes(saved_json: str, config, saved_tokenizer: bool) -> tuple[list, list]:
  """The fields whose values differ between a run's saved config and `config`, as (taken,
  kept): a resumed run builds its checkpoint towers from the architectures it recorded
  (their source, checkpoint, arch, fresh and unused fields no longer apply) and reads its own
  tokenizer copy when it has one (model.text.tokenizer no longer applies); every other field
  is taken. Fields added since the run was recorded count as the run had them
  (checkpoint.ADDED_FIELDS); any other field only one of the two has reads "(unset)" in the
  other."""
  def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                 else {f"{prefix}{key}": value})
    return out

  def kept(key):
    top, part, field = (key.split(".") + ["", ""])[:3]
    if top != "model" or part not in ("image", "text"):
      return False
    return ((config.model[part].source != "init"
             and field in ("source", "checkpoint", "arch", "fresh", "unused"))
            or (saved_tokenizer and part == "text" and field == "tokenizer"))

  def shown(values, key):
    return repr(values[key]) if key in values else "(unset)"

  then, now = flat(ckpt_lib.recorded_config(saved_json)), flat(json.loads(config.to_json()))
  changes = [(k, f"{k} {shown(then, k)} -> {shown(now, k)}")
             for k in sorted(then.keys() | now.keys())
             if k not in then or k not in now or then[k] != now[k]]
  return ([line for k, line in changes if not kept(k)],
          [line for k, line in changes if kept(k)])


def training_data(config, splits: dict, answers, tokenizer, image_size: int, teacher=None):
  """This host's batches of the training split (a grain dataset, `ds[step]`), as the loop
  reads them: fine-tuning (VQA) or pre-training (captions) by `config.model.head`."""
  mc, tc = config.model, config.train
  finetune = mc.head != "none"
  answer_tok = tokenizer.with_max_len(mc.answer_max_len) if mc.head == "generative" else None
  return pipeline.batches(
      splits["train"].source, kind="vqa" if finetune else "caption", tokenizer=tokenizer,
      image_size=image_size, global_batch=tc.batch_size, seed=config.seed,
      augmentation="finetune" if finetune else "pretrain", process_index=jax.process_index(),
      process_count=jax.process_count(),
      answer_vocab=answers if mc.head == "classifier" else None, answer_tokenizer=answer_tok,
      teacher=teacher.pipeline_option() if teacher else None)


def training_splits(config) -> tuple[dict, list | None, str]:
  """(splits, answers, protocol) of the config's data: VQA splits and their answer set, or
  a caption corpus's training split and held-out validation slice. Sets model.num_answers
  for the classifier head."""
  if config.model.head == "none":
    return splits_lib.caption_splits(config.data), None, "pre-training"
  splits = splits_lib.vqa_splits(config.data)
  answers, protocol = splits_lib.answer_set(config.data, splits)
  if config.model.head == "classifier":
    config.model.num_answers = len(answers)
  return splits, answers, protocol


def _print(text: str):
  if jax.process_index() == 0:
    print(text, flush=True)


def data_identity(splits, batch_size: int, seed: int, rng: str = "threefry") -> dict:
  """What a run's batches and random draws depend on: its training and validation examples,
  in order (counts and a digest of their ids), the batch size (a step's position in the data
  is the step times it), the seed (the shuffle, and the step's random key) and the random
  numbers' implementation (`train.rng`). Kept in the run records; resuming checks it."""
  counts, digest = {}, hashlib.sha1()
  for name in ("train", "val"):
    ids = [r["id"] for r in splits[name].records] if name in splits else []
    counts[name] = len(ids)
    digest.update(f"{name}:{len(ids)}\n".encode() + "\n".join(ids).encode() + b"\n")
  return {**counts, "ids_sha1": digest.hexdigest(), "batch_size": int(batch_size),
          "seed": int(seed), "rng": rng}


def check_patterns(config) -> None:
  """Refuses a parameter-path rule that is not a regular expression (or an lr_mults entry
  that is not a (regex, multiplier) pair), naming the field, before anything runs."""
  rules = config.optim.lr_mults
  pairs = [r for r in rules if not (isinstance(r, (tuple, list)) and len(r) == 2
                                    and isinstance(r[1], (int, float)))]
  if pairs:
    raise ValueError(f"optim.lr_mults: {pairs} are not (path regex, multiplier) pairs, e.g. "
                     "((\"image/.*\", 0.0),)")
  fields = ([("optim.lr_mults", p) for p, _ in rules] +
            [("train.init_params", config.train.init_params)] +
            [("train.fsdp_rules", p) for p in config.train.fsdp_rules])
  for field, pattern in fields:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{field}: {pattern!r} is not a regular expression ({e})") from None


def _held(path: Path) -> bool:
  """Whether another open file (another process's run, or this process's) holds the lock
  file `path`: opened to read, locked and at once released. A missing or unreadable file, or a
  filesystem without locks, is left for the lock itself to meet."""
  try:
    with open(path) as f:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  except OSError:
    pass
  return False


class _RunLock:
  """An exclusive lock on a run folder (`<workdir>/.run-lock`) while this process trains in
  it (process 0's, on several hosts). A second training in the folder (the same command run
  again before the first ended; a requeued job overlapping the first) is refused: the two
  logged every step twice, and one removed the other's checkpoint in progress as left by a
  crash. Taken before a checkpoint folder is opened; released when `train` returns."""

  def __init__(self):
    self.file = None

  def hold(self, workdir: Path, probe: bool = False) -> None:
    """Takes the lock (process 0), or refuses the run on every process (none is left waiting
    for process 0 in a collective). Called by every process at the same point.
    probe: only asks whether another training holds the folder, taking and writing nothing:
    the run is refused before its data are built and its model made (minutes, on a real
    model), where a folder's run is still training. The lock is taken later, as ever."""
    path, held = workdir / ".run-lock", False
    if jax.process_index() == 0 and self.file is None:
      held = _held(path) if probe else self._take(workdir, path)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if held:
      raise ValueError(f"{workdir}: another training run is using this folder (it holds "
                       f"{path}): wait for it to end, or train in another train.workdir")

  def _take(self, workdir: Path, path: Path) -> bool:
    """Makes the folder and takes its lock; whether another training holds it."""
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # What `unwritable` let through (root, on a filesystem of its own).
      raise ValueError(f"the work folder {workdir} (train.workdir) cannot be made: "
                       f"{e.strerror} ({e.filename})") from None
    self.file = open(path, "a")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.close()
      self.file = None
      return True
    except OSError as e:  # A filesystem without locks.
      log.warning("cannot lock %s (%s): do not run two trainings in %s at once", path, e,
                  workdir)
    return False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      self.file.close()


def train(config, workdir=None, stream=None) -> dict:
  """Runs (or resumes) the run of `config`; returns the test metrics of a fine-tuning run
  ({} for a pre-training run: its validation metrics are in metrics.jsonl and the run
  records, and its best checkpoint is the one of lowest validation loss)."""
  with _RunLock() as lock:
    return _train(config, workdir, stream, lock)


def _train(config, workdir, stream, lock: _RunLock) -> dict:
  check_named(config, workdir)
  workdir = workdir_of(config, workdir)

  def writable():  # Before the data is built and the model made, not when the folder is.
    blocked = files_lib.unwritable(workdir)
    if blocked:
      raise ValueError(f"the work folder {workdir} (train.workdir) cannot be written "
                       f"({blocked[0]} is {blocked[1]}): name one you can write")

  distributed.on_first_process("make the run folder", writable)
  lock.hold(workdir, probe=True)
  # The data folders as absolute paths, in the config the run records: evaluating or
  # predicting from another folder reads the same dataset (a relative one was rebuilt there).
  for field in ("dir", "source_dir"):
    if config.data.get(field):
      config.data[field] = str(Path(config.data[field]).expanduser().absolute())
  tc, mc = config.train, config.model
  finetune = mc.head != "none"
  main = jax.process_index() == 0
  # Before anything is written (these were refused, or keep < 1 read as 1, with the run
  # folder made).
  small = [f"train.{k}={tc[k]}" for k in ("save_every", "eval_every", "log_every",
                                          "eval_batch_size", "fsdp", "keep") if tc[k] < 1]
  if small:
    raise ValueError(f"{', '.join(small)}: must be 1 or more")
  negative = [f"{name}={value}" for name, value in (
      ("train.prefetch", tc.get("prefetch", 2)), ("data.workers", config.data.workers))
      if value < 0]
  if negative:
    raise ValueError(f"{', '.join(negative)}: must be 0 or more")
  step_lib.check_values(config)
  check_patterns(config)
  mesh = sharding.make_mesh(tc.fsdp)
  step_lib.check_batch(config, tc.batch_size, jax.device_count())
  rng = step_lib.check_rng(tc.get("rng", "threefry"))  # Named before anything runs.
  if not finetune:
    teacher_feed.check_teacher_config(config)

  # ---- data ----
  if jax.process_count() > 1:  # One host builds the dataset if needed; the others wait.
    # Every process refuses a dataset of the wrong kind (none is left waiting for process 0).
    splits_lib.check_kind(config.data, "vqa" if finetune else "caption")
    distributed.on_first_process("prepare the dataset",
                                 lambda: splits_lib.ensure_built(config.data))
  splits, answers, protocol = training_splits(config)
  data = data_identity(splits, tc.batch_size, config.seed, rng)
  steps = total_steps(config, len(splits["train"].records))
  config.optim.total_steps = steps
  # ---- the run folder: what restoring it needs besides the checkpoints ----
  # The tokenizer's files (workdir/tokenizer) and, in each run record, the towers' module
  # fields: resuming, evaluating and predicting then read no tower checkpoint and no
  # tokenizer folder of the config's (a run folder can move to another machine).
  # Nothing is written before the model and the optimizer are built: a run refused by a
  # config error leaves no run folder behind.
  existing = (workdir / "checkpoints").is_dir()
  if existing:
    lock.hold(workdir)
  ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints", keep=tc.keep) if existing else None
  start = ckpts.latest_step() if ckpts else None
  # Read first: a step folder left empty or damaged (an interrupted copy) is named as such,
  # not taken for a step of a longer run.
  record = ckpts.run_record(start) if start is not None else None
  if start is not None and start > steps:
    # Testing (or resuming) it would report steps past the run's stated length.
    raise ValueError(
        f"{workdir}: its latest checkpoint is step {start}, past the run's length now ({steps} "
        "steps: train.epochs or optim.total_steps lowered?); a run cannot be shortened after "
        f"the fact: evaluate one of its steps with `launch/eval.py --checkpoint_dir={workdir} "
        "--step=N`, or train in a new train.workdir")
  archs = record.get("towers") if record else None
  # The teacher's cache and the validation slice are checked before anything is written
  # (a resumed run's cache against the teacher it recorded).
  teacher = None if finetune else teacher_feed.BatchTeacher(config, splits, mesh, record)
  if not finetune and "val" in splits:
    pretrain_eval.examples(config, splits["val"])  # Too small a slice: refused here too.
  tokenizer = ckpt_lib.run_tokenizer(workdir, mc.text, record) if start is not None else None
  new_tokenizer = tokenizer is None
  if new_tokenizer:
    tokenizer = tokenizer_lib.from_config(mc.text)

  # ---- model and state ----
  model, init, loaded = amif.initializer(
      amif.without_checkpoints(config, archs) if archs else config, seed=config.seed)
  archs = amif.tower_archs(model)
  tokenizer_lib.check_fits(tokenizer, {"text tower": model.text, "decoder": model.decoder})
  shapes = jax.eval_shape(init, loaded)
  tx = optim.make(config.optim, shapes)
  shardings = step_lib.state_shardings(mesh, shapes, tx, tuple(tc.fsdp_rules), tc.fsdp_min_size)
  if start is None:
    state = step_lib.create_state(init, tx, shardings,
                                  to_global(loaded, {k: shardings["params"][k] for k in loaded}))
    taken = set()
    if tc.get("init_from"):
      state, taken, summary = warm_start.from_run(config, state, shardings, tokenizer)
      _print(summary)
    warm_start.warn_frozen_random(config, shapes, taken)
  if ckpts is None:
    lock.hold(workdir)  # (A new run's folder is made here: nothing is written before.)
    ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints", keep=tc.keep)
  if new_tokenizer and main:
    tokenizer.save(workdir / ckpt_lib.TOKENIZER)
  if start is not None:
    state, run = ckpts.restore(start, abstract_state(shapes, tx, shardings))
    then = run.get("data", {})  # Records older than a field are not checked for it.
    if any(then[k] != data[k] for k in then.keys() & data.keys()):
      if then.get("seed", data["seed"]) != data["seed"]:
        raise ValueError(
            f"{workdir}: the run was started with seed {then['seed']}, not {data['seed']}: "
            "the rest of its epoch would be shuffled otherwise and its random keys differ, so "
            "resuming would not continue the same run; resume with "
            f"--config.seed={then['seed']} or use a new train.workdir")
      if then.get("rng", data["rng"]) != data["rng"]:
        raise ValueError(
            f"{workdir}: the run was started with train.rng={then['rng']!r}, not "
            f"{data['rng']!r}: its random draws (dropout) would differ from the step reached "
            f"on, so resuming would not continue the same run; resume with "
            f"--config.train.rng={then['rng']} or use a new train.workdir")
      changed = ("batch size" if then.get("batch_size", data["batch_size"]) != data["batch_size"]
                 else "training data")
      raise ValueError(
          f"{workdir}: the run's {changed} changed since its checkpoints were written (then "
          f"{then.get('train')} training and {then.get('val')} validation examples in batches "
          f"of {then.get('batch_size', '?')}, now {data['train']} and {data['val']} in batches "
          f"of {data['batch_size']}, or other ids; was the dataset rebuilt, data.val_fraction "
          f"or train.batch_size changed?): resuming would not continue the same run; use a "
          f"new train.workdir")
    if finetune and run.get("answers") != answers:
      raise ValueError(f"{workdir}: the checkpoint's answer set differs from the data's (was the "
                       "dataset rebuilt or the protocol changed?); use a new train.workdir")
    _print(f"resumed from {workdir / 'checkpoints'} step {start}")
    note = notes.devices_note(run.get("devices"), jax.device_count())
    if note:
      _print(note)
    taken, kept = (config_changes(run["config"], config, not new_tokenizer)
                   if run.get("config") else ([], []))
    if taken:
      _print("the config differs from the one the run was started with; it continues under "
             "the new values (train.init_from only starts a run):\n  " + "\n  ".join(taken))
      note = notes.schedule_note(run["config"], config.optim, start)
      if note:
        _print(note)
    if kept:
      log.warning("these config changes do not apply to a resumed run, which keeps its "
                  "recorded tower architectures and its tokenizer copy (start a new "
                  "train.workdir to change them):\n  %s", "\n  ".join(kept))
  else:
    start = 0

  # ---- objective and input ----
  if finetune:
    prior_ids, prior_mask = gca.answer_prior(answers, tokenizer.hf, mc.prior_max_tokens)
    # NumPy, not device arrays: constants of the compiled step (a device array captured by
    # the step would be copied back to the host to be embedded, which the guard forbids).
    objective = step_lib.finetune_objective(model, prior_ids, prior_mask)
  else:
    objective = step_lib.pretrain_objective(model, config.losses)
  if tc.get("inject_nan_at"):
    clean = objective

    def objective(params, batch, key):  # noqa: F811
      # Testing: one step's gradient is infinite while its loss stays finite (the update
      # then turns the parameters to NaN). d sqrt(u)/du at u = 0 is infinite; `u` is 1 (a
      # finite gradient, times 0) at the other steps, and the added term's value is 0.
      loss, metrics = clean(params, batch, key)
      poison = batch["poison"]
      spike = sum(jnp.sqrt(x - jax.lax.stop_gradient(x) + 1 - poison).sum()
                  for x in jax.tree.leaves(params))
      return loss + poison * (spike - jax.lax.stop_gradient(spike)), metrics
  train_step = step_lib.make_train_step(
      objective, tx, shardings, tc.accum_steps, optim.frozen_mask(config.optim, shapes), rng,
      determinism.compiler_options(config, mesh))
  base_key = step_lib.base_key(config.seed, rng, mesh)
  image_size = model.image.image_size
  ds = training_data(config, splits, answers, tokenizer, image_size, teacher)

  # ---- evaluation ----
  predictor = pretrain_validator = None
  if finetune:
    predictor = vqa_eval.Predictor(model, config, answers, tokenizer, mesh, shardings["params"])
  elif "val" in splits:
    pretrain_validator = pretrain_eval.Validator(model, config, splits["val"], tokenizer,
                                                 image_size, mesh, teacher, stream)

  def validate(state, step) -> dict:
    if pretrain_validator is not None:
      return pretrain_validator(state["params"], step)
    if not finetune or "val" not in splits:
      return {}
    rows = vqa_eval.answer_split(predictor, state["params"], splits["val"], tokenizer=tokenizer,
                                 image_size=image_size, global_batch=tc.eval_batch_size,
                                 progress=observe.progress(f"validation at step {step}", main,
                                                           stream))
    m = vqa_eval.evaluate(rows, splits["val"], protocol, step)
    return {"val_accuracy": m["overall"], "val_questions": m["questions"]}

  tokenizer_fingerprint = tokenizer.fingerprint()  # The run's copy is checked against it.

  def run_record(step, val):
    return {"step": int(step), "data_step": int(step), "config": config.to_json(),
            "protocol": protocol, "answers": answers, "val": val, "towers": archs,
            "data": data, "devices": jax.device_count(),
            "teacher": teacher.fingerprint if teacher else None,
            "tokenizer": tokenizer_fingerprint}

  reporter = observe.Reporter(workdir, total_steps=steps, start_step=start,
                              batch_size=tc.batch_size, log_every=tc.log_every, enabled=main,
                              tensorboard=tc.tensorboard, stream=stream)
  _print(f"{'fine-tuning' if finetune else 'pre-training'} {config.data.name}: "
         f"{len(splits['train'].records)} training examples, {steps} step{'s' * (steps != 1)} of "
         f"{tc.batch_size} on {jax.device_count()} {jax.devices()[0].platform} device(s)"
         + (f", {len(answers)} answers ({protocol})" if finetune else "")
         + (f", validating on {pretrain_validator.examples} held-out examples"
            if pretrain_validator else ""))
  pieces = notes.question_pieces(splits, tokenizer) if finetune else None
  said = [notes.selection_note(tc, steps) if "val" in splits else None,
          notes.workers_note(jax.devices()[0].platform, config.data.workers)]
  if finetune:
    said += [notes.cut_questions_note(splits, tokenizer, mc.text.max_len, pieces),
             notes.unknown_pieces_note(splits, answers, tokenizer, pieces=pieces),
             notes.test_overlap_note(splits)]
  for note in filter(None, said):
    _print(note)
  if start >= steps:
    _print(f"the run is complete (step {start} of {steps})"
           + ("; evaluating its best-on-validation checkpoint on test" if finetune else ""))

  # ---- the loop ----
  pending: list = []
  last_saved = start if ckpts.latest_step() is not None else None

  def drain(keep: int = 0):
    while len(pending) > keep:
      step, metrics = pending.pop(0)
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      # A finite loss with a non-finite gradient has already made the parameters NaN: its
      # step must not be saved either.
      bad = [k for k in ("loss", "grad_norm") if not math.isfinite(values.get(k, 0.0))]
      if bad:
        reporter.flush()
        where = (f"the last good checkpoint is step {last_saved} in {workdir / 'checkpoints'}"
                 if last_saved is not None else "no checkpoint was saved")
        what = {"loss": "the loss", "grad_norm": "the gradient norm"}[bad[0]]
        raise Diverged(f"{what} is {values[bad[0]]} at step {step}: stopping ({where})")
      reporter.step(step, values)

  def device_batches(it):
    for step in range(start, steps):
      host = next(it)
      ids = host.pop("id")
      host.pop("answer", None)
      if teacher is not None:
        host.update(teacher.host_fields(ids))
      if tc.get("inject_nan_at"):
        host["poison"] = np.float32(step + 1 == tc.inject_nan_at)
      batch = sharding.shard_batch(mesh, host)
      yield teacher.device_fields(batch) if teacher is not None else batch

  try:
    # A scheduler's stop request (SIGTERM): the step reached is saved, then the run stops.
    with preemption.listening(), \
        pipeline.iterate(ds, start_step=start, num_workers=config.data.workers) as it:
      feed = sharding.prefetch(device_batches(it), tc.get("prefetch", 2))
      for step in range(start, steps):
        batch = next(feed)
        with jax.transfer_guard("disallow"):
          state, metrics = train_step(state, batch, base_key)
        pending.append((step + 1, metrics))
        drain(keep=1)
        done = step + 1
        stopping = preemption.reached(done)
        # A validation due at this step is done before stopping: the resumed run would skip it.
        evaluate_now = done % tc.eval_every == 0 or done == steps
        scheduled = done % tc.save_every == 0 or done == steps
        save_now = scheduled or stopping
        if evaluate_now or save_now:
          drain()
          paused = time.perf_counter()
          val = validate(state, done) if evaluate_now else {}
          if val:
            reporter.eval(done, {k.removeprefix("val_"): v for k, v in val.items()})
          if save_now:
            # Every step logged up to the checkpoint is on disk before it: a run killed
            # later resumes from it and logs the steps after it only.
            reporter.flush()
            # Only the scheduled saves compete for the best step: the run uninterrupted
            # would not have saved a stop's step, and the choice would depend on when the stop
            # came. Its validation is in the logs.
            chosen = val if scheduled else {}
            with preemption.deferred():  # Ctrl-C waits for the state's copy to the host.
              ckpts.save(done, state, run_record(done, chosen), metrics=chosen or None,
                         stop=not scheduled)
            last_saved = done
          reporter.exclude(time.perf_counter() - paused)
        if stopping:
          _print(f"stop requested (SIGTERM): stopping with a checkpoint of step {done}")
          break
      # The last batches live in the workers' shared memory: release them now, not at exit.
      feed.close()
      batch = None
    drain()
  finally:
    reporter.close()
    ckpts.wait()

  if not finetune:
    best = ckpts.best_step()
    val = ckpts.run_record(best).get("val") or {}
    ckpts.close()
    which = (f"best on validation step {best} (val_loss {val['val_loss']:.4f})"
             if "val_loss" in val else f"step {best} (no validation: the latest)")
    _print(f"pre-training done: {which} of {steps}, in {workdir / 'checkpoints'}; the next "
           f"stage starts from it with --config.train.init_from={workdir}")
    return {}
  # ---- test, once, on the best-on-validation checkpoint ----
  best = ckpts.best_step()
  val = ckpts.run_record(best).get("val") or {}
  _print(f"fine-tuning done: testing step {best}, " + (
      f"the best on validation (val_accuracy {val['val_accuracy']:.4f}) of the saved steps "
      f"{ckpts.steps()}" if "val_accuracy" in val else "the latest (no validation)"))
  if best != ckpts.latest_step() or start == steps:
    state, _ = ckpts.restore(best, abstract_state(shapes, tx, shardings))
  ckpts.close()
  t0 = time.perf_counter()
  label = f"{splits['test'].name} (step {best})"  # The split's own name: test_split may differ.
  rows = vqa_eval.answer_split(predictor, state["params"], splits["test"], tokenizer=tokenizer,
                               image_size=image_size, global_batch=tc.eval_batch_size,
                               progress=observe.progress(label, main, stream))
  metrics = vqa_eval.evaluate(rows, splits["test"], protocol, best,
                              baseline=splits_lib.majority_answer(splits["train"].records),
                              predictable=predictor.predictable)
  metrics["seconds"] = round(time.perf_counter() - t0, 1)
  if main:
    vqa_eval.write(workdir / "eval" / splits["test"].name, metrics, rows)
  return metrics
