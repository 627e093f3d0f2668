"""A trained model back from its checkpoint folder, on whatever devices this process has:
the run's config and answer set come from the checkpoint's record; the parameters are
restored directly into the shardings of the current mesh."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import jax
import ml_collections

from medvqa_jax import files as files_lib
from medvqa_jax.data import builders
from medvqa_jax.data import splits as splits_lib
from medvqa_jax.data import tokenizer as tokenizer_lib
from medvqa_jax.evaluate import vqa as vqa_eval
from medvqa_jax.models import amif
from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import distributed, observe, sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  model: amif.AMiF
  params: dict
  answers: list[str]
  protocol: str
  step: int
  mesh: object
  param_shardings: dict
  tokenizer: tokenizer_lib.Tokenizer
  workdir: Path  # The run folder it was restored from (where it is now, not where it ran).
  record: dict = dataclasses.field(default_factory=dict)  # The step's run record.
  changes: list = dataclasses.field(default_factory=list)  # The overrides taken, as "f a -> b".

  @property
  def data(self) -> dict:
    """The run record's data identity."""
    return self.record.get("data") or {}

  def predictor(self, candidates: list[str] | None = None) -> vqa_eval.Predictor:
    """Answers among `candidates` (default: the run's answers). The GCA prior, an input of
    the model, is always the run's: the one it was trained with."""
    return vqa_eval.Predictor(self.model, self.config,
                              self.answers if candidates is None else candidates,
                              self.tokenizer, self.mesh, self.param_shardings,
                              prior_answers=self.answers)


def saved_config(run: dict) -> ml_collections.ConfigDict:
  """The run's config, with fields added since it was recorded as the run had them: its
  evaluation can set them."""
  return ml_collections.ConfigDict(ckpt_lib.recorded_config(run["config"]))


def with_overrides(saved: ml_collections.ConfigDict, overrides: dict | None):
  """(the run's config with `overrides` {"data.dir": value, ...} set, the changes as
  "field old -> new"). A field the run's config does not have is refused."""
  config = copy.deepcopy(saved)
  changes = []
  for field, value in (overrides or {}).items():
    *parents, name = field.split(".")
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if not hasattr(node, "get") or name not in node:
      raise ValueError(f"--config.{field}: the run's config has no such field")
    if node[name] != value:
      changes.append(f"{field} {node[name]!r} -> {value!r}")
      node[name] = value
  return config, changes


_TOWER_FIELDS = ("source", "checkpoint", "arch", "fresh", "unused")


def unused_overrides(fields, saved, run: dict, tokenizer_copy: bool) -> dict[str, str]:
  """The overridden `fields` ("train.fsdp", ...) that an evaluation of the run (its `saved`
  config, its `record`) does not read, each with why: they were set, listed among the
  evaluation's config changes and recorded in its metrics, and changed nothing. An evaluation
  answers with the saved weights (no optimiser, schedule or dropout), shards them by
  `fsdp` (eval.py's --fsdp), builds checkpoint towers from the architectures the run
  recorded and reads the run's tokenizer copy where it has one; a VQA evaluation reads its
  batches in threads, in train.eval_batch_size, with no loss terms, teacher or seed. Either
  compiles with train.deterministic's options (determinism.py)."""
  pretraining = saved.model.head == "none"
  used_train = (("batch_size",) if pretraining else ("eval_batch_size",)) + (
      "fsdp_rules", "fsdp_min_size", "deterministic")
  out = {}
  for field in fields:
    top, part, name = (field.split(".") + ["", ""])[:3]
    if field == "train.fsdp":
      out[field] = "an evaluation shards the parameters by eval.py's --fsdp"
    elif top == "optim" or (top == "train" and part not in used_train) or field == "model.dropout":
      out[field] = "a training setting"
    elif not pretraining and top in ("losses", "teacher"):
      out[field] = "a pre-training setting"
    elif not pretraining and field == "data.workers":
      out[field] = "a VQA evaluation reads its batches in threads, unaugmented"
    elif not pretraining and field == "seed":
      out[field] = "a VQA evaluation draws nothing"
    elif field == "model.num_answers":
      out[field] = "the run's own answers are evaluated"
    elif field in ("model.rank_k", "model.rank_score") and saved.model.head != "generative":
      out[field] = "only the generative head ranks candidate answers"
    elif (top == "model" and part in (run.get("towers") or {}) and name in _TOWER_FIELDS
          and saved.model[part].get("source", "init") != "init"):
      out[field] = f"the {part} tower is built from the architecture the run recorded"
    elif field == "model.text.tokenizer" and tokenizer_copy:
      out[field] = "the run's own tokenizer copy is read"
  return out


def restore(checkpoint_dir, overrides: dict | None = None, step: int | None = None,
            fsdp: int | None = None, answering: bool = False) -> Restored:
  """The model of a run. checkpoint_dir: the run's workdir, its checkpoints folder or one step
  folder; step: None for the best on validation. The config is the run's own (from its
  record), with `overrides` ({"data.dir": "/new/place", ...}: where the data are now, the
  eval batch size) set on it. answering: a pre-training run (no answer head) is refused,
  before anything is restored."""
  folder, named_step = ckpt_lib.resolve(checkpoint_dir)
  if None not in (step, named_step) and step != named_step:
    raise ValueError(f"--step={step}, but {checkpoint_dir} is the folder of step {named_step}: "
                     "give one of them (the run's folder with --step, or the step's folder)")
  ckpts = ckpt_lib.Checkpoints(folder, read_only=True)
  step = step if step is not None else named_step
  chosen_as_best = step is None
  if step is None:
    step = ckpts.best_step()
  if step is None:
    cut = sorted(p.name for p in folder.glob("*.orbax-checkpoint-tmp*"))
    raise FileNotFoundError(f"no complete checkpoint in {folder}" + (
        f" (the save of {cut[0].split('.')[0]} was cut short, leaving {', '.join(cut)}: the "
        "run stopped before its first checkpoint was written)" if cut else
        " (expected a run's folder, its checkpoints/ folder or one step's folder)"))
  if step not in ckpts.steps():
    raise FileNotFoundError(f"no checkpoint of step {step} in {folder}; it has {ckpts.steps()}")
  run = ckpts.run_record(step)
  if chosen_as_best and not ckpt_lib.validated(run.get("val")):
    log.warning("no step in %s has a finite validation metric: reading the latest, step %d",
                folder, step)
  saved = saved_config(run)
  if answering and saved.model.head == "none":
    raise ValueError(f"{checkpoint_dir} is a pre-training run: it has no answer head (answering "
                     "questions needs a fine-tuned run)")
  overrides = dict(overrides or {})
  with_overrides(saved, overrides)  # Refuses a field the run's config lacks.
  tokenizer_copy = (folder.parent / ckpt_lib.TOKENIZER).is_dir()
  for field, why in unused_overrides(overrides, saved, run, tokenizer_copy).items():
    log.warning("--config.%s: not used by an evaluation (%s): left out", field, why)
    del overrides[field]
  config, changes = with_overrides(saved, overrides)
  if config.train.get("eval_batch_size", 1) < 1:  # (A ZeroDivisionError in the batching.)
    raise ValueError(f"--config.train.eval_batch_size={config.train.eval_batch_size}: must be "
                     "1 or more")
  if bool(config.data.get("closed_set")) != bool(saved.data.get("closed_set")):
    raise ValueError("--config.data.closed_set: evaluation keeps the run's answer protocol "
                     "unless asked with --closed_set (or --noclosed_set), which the "
                     "evaluation's outputs are then filed under")
  if config.model.head != saved.model.head:
    raise ValueError(f"the checkpoint in {folder} is of a run with model.head="
                     f"{saved.model.head!r}, but --config.model.head says {config.model.head!r}: "
                     "evaluate it with its own head (leave --config.model.head as the run had it)")
  if config.model.head != "none":
    config.model.num_answers = saved.model.get("num_answers")
  if run.get("towers"):  # The recorded towers: no tower checkpoint is read.
    config = amif.without_checkpoints(config, run["towers"])
  tokenizer = ckpt_lib.run_tokenizer(folder.parent, config.model.text, run)
  if tokenizer is None:
    log.warning("%s has no %s/ folder (the tokenizer the run saved): using the one its config "
                "names, which must be the one it was trained with", folder.parent,
                ckpt_lib.TOKENIZER)
    tokenizer = tokenizer_lib.from_config(config.model.text)
    recorded, found = run.get("tokenizer"), tokenizer.fingerprint()
    if recorded and found != recorded:  # Other token ids: every answer silently otherwise.
      named = config.model.text.get("tokenizer") or config.model.text.get("checkpoint")
      raise ValueError(
          f"the tokenizer in {named}, which the config names, is not the one the run was "
          f"trained with (its fingerprint is {found}, the run recorded {recorded}): copy "
          f"the run's {ckpt_lib.TOKENIZER}/ folder into {folder.parent}, or name the "
          "tokenizer it was trained with (--config.model.text.tokenizer=FOLDER)")
  mesh = sharding.make_mesh(fsdp if fsdp is not None else 1)
  model, init, loaded = amif.initializer(config, seed=config.seed)
  tokenizer_lib.check_fits(tokenizer, {"text tower": model.text, "decoder": model.decoder})
  shapes = jax.eval_shape(init, loaded)
  shardings = sharding.param_shardings(mesh, shapes, tuple(config.train.fsdp_rules),
                                       config.train.fsdp_min_size)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  params = ckpts.restore_params(step, abstract)
  ckpts.close()
  return Restored(config, model, params, run.get("answers") or [], run.get("protocol", ""), step,
                  mesh, shardings, tokenizer, folder.parent, run, changes)


def check_data(restored: Restored, splits: dict) -> None:
  """Refuses data whose training and validation examples are not the run's (recorded when it
  was trained): another held-out slice (data.val_fraction) would hold examples the run
  trained on, and another dataset another majority baseline."""
  from medvqa_jax.train import loop
  then = restored.data
  if not then:  # A record older than the field.
    return
  now = loop.data_identity(splits, then.get("batch_size", 1), then.get("seed", 0))
  if any(then[k] != now[k] for k in ("train", "val", "ids_sha1") if k in then):
    raise ValueError(
        f"the data are not the run's: it trained on {then.get('train')} examples and "
        f"validated on {then.get('val')}, and the data now give {now['train']} and "
        f"{now['val']}, or other ids (another dataset or data.val_fraction?); evaluate "
        "with the run's own data settings (override only where the data are, e.g. "
        "--config.data.dir)")


def built_data(dc, changes=()):
  """`dc` (a copy of the data config) for reading the run's dataset as it is built: an
  evaluation does not build (the run's data.dir is where the data were; a build there from
  its source would write into another machine's or user's old folder), and a source folder
  the run recorded but that is not here is not checked against (a run folder copied to
  another machine). `changes`: the overrides taken (`Restored.changes`)."""
  dc = copy.deepcopy(dc)
  if dc.get("dir") and dc.get("name") and not builders.is_built(dc.dir, dc.name):
    raise FileNotFoundError(
        f"dataset {dc.name} is not built in {dc.dir} (the run's data.dir, unless overridden): "
        f"pass --config.data.dir=FOLDER where it is built now, or build it there first "
        f"(launch/prepare_data.py --dataset={dc.name} --source_dir=DOWNLOAD "
        f"--data_dir={dc.dir}); an evaluation does not build")
  given = any(c.startswith("data.source_dir ") for c in changes)
  if dc.get("source_dir") and not given and not Path(dc.source_dir).is_dir():
    log.warning("the run's source folder %s is not here: %s in %s is read as it is built, "
                "unchecked against it", dc.source_dir, dc.name, dc.dir)
    dc.source_dir = ""
  return dc


def output_folder(out_dir, default: Path) -> Path:
  """The folder an evaluation writes its results into (`out_dir`, else `default`), refused
  before any answering if it cannot be written (a read-only run folder): the results were
  computed, then lost in a traceback. Checked on process 0, which writes them."""
  out = Path(out_dir) if out_dir is not None else default

  def check():
    blocked = files_lib.unwritable(out)
    if blocked:
      raise PermissionError(
          f"{out}: {blocked[0]} cannot be written" + (" (a read-only run folder?)"
                                                      if out_dir is None else "")
          + ": pass --out=FOLDER to write the results elsewhere")

  distributed.on_first_process("write the evaluation's results", check)
  return out


def replacing_note(out_dir: Path) -> None:
  """Says which earlier results an evaluation replaces (the same step and split, perhaps
  under other overrides): they were replaced silently."""
  try:
    then = json.loads((out_dir / "metrics.json").read_text())
  except (OSError, ValueError):
    return
  overall = then.get("overall")
  log.warning("replacing the results in %s (step %s%s%s)", out_dir, then.get("step"),
              f", overall {100 * overall:.1f}%" if isinstance(overall, (int, float)) else "",
              f", computed with {'; '.join(then['config_changes'])}"
              if then.get("config_changes") else "")


def split_role(dc, split_name: str) -> str:
  """The role ("train", "val" or "test") of a split named on the command line: the dataset's
  own names for its splits (data.test_split, data.val_split) first, then "test", "val" and
  "validation" (with data.test_split="validation", --split=validation is the test split and
  --split=val the validation one)."""
  roles = {"train": "train", "test": "test", "val": "val", "validation": "val",
           dc.get("val_split") or "val": "val", dc.test_split: "test"}
  if split_name not in roles:
    raise ValueError(f"unknown split {split_name!r}: expected train, val or test")
  return roles[split_name]


def results_name(dc, role: str, step: int, closed: bool, rank_score: str = "likelihood") -> str:
  """The folder of an evaluation's results in <workdir>/eval: <split>-step<N>, the test split
  by its own name (data.test_split), the validation split as "validation" ("val" where the
  test split is named "validation"), with "-closed-set" under the closed-set protocol and
  "-first-token-twice" where the generative head's candidates are re-scored so
  (model.rank_score): each role, protocol and score its own folder, none replacing another's."""
  folder = {"train": "train", "test": dc.test_split,
            "val": "val" if dc.test_split == "validation" else "validation"}[role]
  return (f"{folder}-step{step}" + ("-closed-set" if closed else "") +
          ("" if rank_score == "likelihood" else "-" + rank_score.replace("_", "-")))


def evaluate_split(restored: Restored, split_name: str | None = None, out_dir=None,
                   closed_set: bool | None = None) -> dict:
  """Answers a split of the run's dataset (default: test), writes metrics.json and
  predictions.jsonl into out_dir (default: <workdir>/eval/<split>-step<N>, with -closed-set
  appended under the closed-set protocol) and returns the metrics (with the config overrides
  taken, `config_changes`, where there are any). A pre-training run is evaluated on its
  held-out slice (`evaluate_pretraining`)."""
  if restored.config.model.head == "none":
    return evaluate_pretraining(restored, split_name, out_dir)
  split_name = split_name or "test"
  config, dc = restored.config, restored.config.data
  # The protocol is the run's (its record's), whatever the config given says, unless
  # `closed_set` asks for the other one.
  run_closed = (restored.protocol == splits_lib.CLOSED_SET if restored.protocol
                else bool(dc.closed_set))
  closed = run_closed if closed_set is None else bool(closed_set)
  dc = built_data(dc, restored.changes)  # A copy: the restored config is left as it was.
  dc.closed_set = closed
  candidates, protocol = restored.answers, restored.protocol
  if closed != run_closed:
    if config.model.head == "classifier":
      raise ValueError("the classifier's answers are fixed when it is trained: the protocol "
                       "cannot change at evaluation (train with --config.data.closed_set)")
    if run_closed:
      raise ValueError("the run was trained under the closed-set protocol: its GCA prior, an "
                       "input of the model, holds the answers of every split, test included, "
                       "so no evaluation of it is open-set (train with "
                       "--config.data.closed_set=False for that)")
    # Only the candidates change: the GCA prior stays the one the model was trained with,
    # and the protocol's name says so (it is not the paper's, whose prior is closed-set too).
    candidates, _ = splits_lib.answer_set(dc)
    protocol = splits_lib.CLOSED_CANDIDATES
  key = split_role(dc, split_name)
  score = (config.model.get("rank_score", "likelihood") if config.model.head == "generative"
           else "likelihood")
  out_dir = output_folder(out_dir, restored.workdir / "eval" /
                          results_name(dc, key, restored.step, closed, score))
  splits = splits_lib.vqa_splits(dc, need=tuple({key, "train", "val"}))
  check_data(restored, splits)
  predictor = restored.predictor(candidates)
  rows = vqa_eval.answer_split(predictor, restored.params, splits[key],
                               tokenizer=restored.tokenizer,
                               image_size=restored.model.image.image_size,
                               global_batch=config.train.eval_batch_size,
                               progress=observe.progress(splits[key].name,
                                                         jax.process_index() == 0))
  metrics = vqa_eval.evaluate(rows, splits[key], protocol, restored.step,
                              baseline=splits_lib.majority_answer(splits["train"].records),
                              predictable=predictor.predictable)
  metrics["run"] = str(restored.workdir)
  if restored.changes:  # What these numbers were computed under, beside the run's config.
    metrics["config_changes"] = list(restored.changes)
  if jax.process_index() == 0:
    replacing_note(out_dir)
    vqa_eval.write(out_dir, metrics, rows)
  return metrics


def evaluate_pretraining(restored: Restored, split_name: str | None = None, out_dir=None) -> dict:
  """The validation of a pre-training run (its objective and retrieval recall on the corpus's
  held-out slice, as during training), for the restored step; writes metrics.json."""
  from medvqa_jax.evaluate import pretrain as pretrain_eval
  from medvqa_jax.train import teacher_feed
  if split_name not in (None, "val", "validation"):
    raise ValueError(f"a pre-training run is evaluated on the held-out slice of its corpus "
                     f"(--split=validation), not on {split_name!r}")
  config = restored.config
  out_dir = output_folder(out_dir, restored.workdir / "eval" / f"validation-step{restored.step}")
  splits = splits_lib.caption_splits(built_data(config.data, restored.changes))
  if "val" not in splits:
    raise ValueError("the run held out no validation slice (data.val_fraction was 0): there "
                     "is no held-out example to evaluate it on")
  check_data(restored, splits)
  teacher = teacher_feed.BatchTeacher(config, splits, restored.mesh, restored.record)
  validator = pretrain_eval.Validator(restored.model, config, splits["val"], restored.tokenizer,
                                      restored.model.image.image_size, restored.mesh, teacher)
  metrics = {"split": splits["val"].name, "step": restored.step,
             **validator(restored.params, restored.step), "run": str(restored.workdir)}
  if restored.changes:
    metrics["config_changes"] = list(restored.changes)
  if jax.process_index() == 0:
    replacing_note(out_dir)
    vqa_eval.write(out_dir, metrics, None)
  return metrics
