"""A run folder is restored without the tower checkpoint and tokenizer folders its config
names: the run keeps a copy of its tokenizer and records its towers' module fields, so
resuming, evaluating and predicting read neither (a run folder can move to another machine)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import helpers
from medvqa_jax import ASSETS
from medvqa_jax.data.tokenizer import Tokenizer
from medvqa_jax.evaluate import run as run_lib
from medvqa_jax.models import amif
from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import loop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def text_checkpoint(tmp_path):
  """A BERT checkpoint of the tiny text tower's shape (random weights), with the bundled
  vocabulary as its tokenizer."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=64)
  folder = tmp_path / "bert"
  transformers.BertModel(cfg).save_pretrained(folder)
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(ASSETS / "bert_uncased_vocab" / name, folder / name)
  return folder


def _config(text_checkpoint, tmp_path):
  from configs.towers.common import tower
  config = helpers.tiny_config()
  config.model.text = tower("bert", "hf_bert", dict(pooler="cls"),
                            checkpoint=str(text_checkpoint), max_len=30)
  config.model.answer_max_len = 8  # Re-ranking at 32 pieces: 5x the time.
  config.data.update(dir=str(tmp_path / "data"), val_fraction=0.03,
                     source_dir=str(helpers.demo_part(tmp_path / "source")))
  config.optim.total_steps = 2
  config.train.update(workdir=str(tmp_path / "run"), epochs=0, batch_size=16, save_every=2,
                      eval_every=2, tensorboard=False)
  return config


def _same(a: dict, b: dict):
  """The same metrics, but for the time taken and the run folder (eval.py's name it)."""
  a, b = dict(a), dict(b)
  for key in ("seconds", "run"):
    a.pop(key, None), b.pop(key, None)
  assert a == b


def test_a_work_folder_that_cannot_be_made_is_named(tmp_path, monkeypatch):
  """What the early check lets through (root may write anywhere but where the filesystem
  says no, as sysfs does) was a PermissionError traceback when the folder was made."""
  def refused(self, *a, **k):
    raise PermissionError(1, "Operation not permitted", str(self))

  monkeypatch.setattr(Path, "mkdir", refused)
  with pytest.raises(ValueError, match=re.escape(
      f"the work folder {tmp_path / 'run'} (train.workdir) cannot be made: Operation not "
      f"permitted ({tmp_path / 'run'})")):
    loop._RunLock().hold(tmp_path / "run")


def test_run_restores_without_the_tower_checkpoint_or_tokenizer_folder(text_checkpoint,
                                                                        tmp_path, caplog,
                                                                        monkeypatch):
  config = _config(text_checkpoint, tmp_path)
  monkeypatch.chdir(tmp_path)
  config.data.dir = "data"  # Relative to the folder the run starts in: recorded absolute.
  # A run refused by its config (here an lr_mults rule matching no parameter) writes nothing.
  bad = config.copy_and_resolve_references()
  bad.optim.lr_mults = (("imag/.*", 0.0),)
  with pytest.raises(ValueError, match="match no parameter path"):
    loop.train(bad)
  # So are counts below 1 (a zero save_every was a ZeroDivisionError after the first step,
  # a zero batch a grain traceback, both with the run folder written).
  # And so are parameter-path rules that are not regular expressions (an re.error traceback
  # before), or FSDP rules that match no parameter (their parameters were left replicated).
  for field, value, message in (
      ("train.save_every", 0, r"train.save_every=0: must be 1 or more"),
      ("train.fsdp", 0, r"train.fsdp=0: must be 1 or more"),
      # keep=0 or less was read as 1; negative prefetch and workers refused in the loop.
      ("train.keep", 0, r"train.keep=0: must be 1 or more"),
      ("train.prefetch", -1, r"train.prefetch=-1: must be 0 or more"),
      ("data.workers", -1, r"data.workers=-1: must be 0 or more"),
      ("train.batch_size", 0, r"the batch size \(0\) and train.accum_steps"),
      ("train.accum_steps", -2, r"train.accum_steps \(-2\) must be 1"),
      ("optim.lr_mults", (("image/(.*", 0.0),),
       r"optim.lr_mults: 'image/\(\.\*' is not a regular expression \(missing \)"),
      ("optim.lr_mults", (("image/.*",),), r"optim.lr_mults: \[\('image/\.\*',\)\] are not "
       r"\(path regex, multiplier\) pairs"),
      ("train.init_params", "text/[", r"train.init_params: 'text/\[' is not a regular expr"),
      ("train.fsdp_rules", ("*",), r"train.fsdp_rules: '\*' is not a regular expression"),
      ("train.fsdp_rules", (".*kernel", "vit/.*"),
       r"train.fsdp_rules: \['vit/\.\*'\] match no parameter path; paths start with \[")):
    bad = config.copy_and_resolve_references()
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match=message):
      loop.train(bad)
  # A tokenizer with more ids than the tower's table (their embeddings would be NaN).
  longer = tmp_path / "longer_vocab"
  shutil.copytree(ASSETS / "bert_uncased_vocab", longer)
  with open(longer / "vocab.txt", "a") as f:
    f.write("".join(f"newword{i}\n" for i in range(5)))
  bad = config.copy_and_resolve_references()
  bad.model.text.tokenizer = str(longer)
  with pytest.raises(ValueError, match=r"the tokenizer of model.text has 30527 token ids, but "
                                       r"the text tower's embedding table has 30522 rows"):
    loop.train(bad)
  assert not (tmp_path / "run").exists()
  # A work folder that is a file is named as such, and left as it was.
  (tmp_path / "file").write_text("notes")
  with pytest.raises(ValueError, match=r"the work folder .*file \(train.workdir\) is a file"):
    loop.train(config, workdir=tmp_path / "file")
  assert (tmp_path / "file").read_text() == "notes"
  # One that cannot be written (or made) is refused before the dataset is built and the model
  # made: a PermissionError came when the folder was made, after both. (os.access says no:
  # the tests may run as root, whom no mode stops.)
  shut = tmp_path / "shut"
  shut.mkdir()
  with monkeypatch.context() as m:
    helpers.unwritable(m, shut)
    fresh = config.copy_and_resolve_references()
    fresh.data.dir = str(tmp_path / "fresh_data")
    for workdir in (shut, shut / "run" / "one"):
      with pytest.raises(ValueError, match=re.escape(
          f"the work folder {workdir} (train.workdir) cannot be written ({shut} is a folder "
          "not writable here): name one you can write")):
        loop.train(fresh, workdir=workdir)
  assert not (tmp_path / "fresh_data").exists() and not any(shut.iterdir())
  model, _, loaded = amif.initializer(config)
  assert "text" in loaded and "decoder" in loaded  # Both read from the checkpoint.
  metrics = loop.train(config)
  workdir = tmp_path / "run"
  assert (workdir / ckpt_lib.TOKENIZER / "tokenizer_config.json").exists()

  gone = text_checkpoint.with_name("bert-moved")
  text_checkpoint.rename(gone)  # The checkpoint (and with it the tokenizer) is gone,
  moved = workdir.rename(tmp_path / "moved")  # and the run folder is somewhere else.
  with pytest.raises(FileNotFoundError, match="does not exist"):
    amif.initializer(config)

  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")  # Evaluated from another folder: the same data.
  restored = run_lib.restore(moved)
  assert restored.config.data.dir == str(tmp_path / "data")
  assert amif.tower_archs(restored.model) == amif.tower_archs(model)
  assert restored.model.decoder == model.decoder
  texts = ["is there a fracture?", "what organ is shown in this image?"]
  reference = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=30)
  for key, value in reference(texts).items():
    assert (restored.tokenizer(texts)[key] == value).all(), key
  _same(run_lib.evaluate_split(restored, "test"), metrics)
  assert (moved / "eval" / "test-step2" / "metrics.json").exists()  # Beside the run, as moved.
  val = run_lib.evaluate_split(restored, "validation")
  assert val["split"].startswith("train (held-out")  # Named for what it is,
  assert (moved / "eval" / "validation-step2" / "metrics.json").exists()  # filed plainly.
  assert not workdir.exists() and not any((tmp_path / "elsewhere").iterdir())
  # The closed-set protocol at evaluation: the candidates of every split, test included,
  # while the GCA prior (an input of the model) stays the one it was trained with.
  from medvqa_jax.evaluate import vqa as vqa_eval
  from medvqa_jax.models import gca
  used = []
  answer_split = vqa_eval.answer_split
  vqa_eval.answer_split = lambda predictor, *a, **k: used.append(predictor) or answer_split(
      predictor, *a, **k)
  try:
    closed = run_lib.evaluate_split(restored, "test", closed_set=True, out_dir=tmp_path / "cs")
  finally:
    vqa_eval.answer_split = answer_split
  assert closed["protocol"].startswith("closed-set")
  (predictor,) = used
  assert len(predictor.answers) > len(restored.answers)
  trained = gca.answer_prior(restored.answers, restored.tokenizer.hf,
                             config.model.prior_max_tokens)
  for got, want in zip((predictor.prior_ids, predictor.prior_mask), trained):
    np.testing.assert_array_equal(np.asarray(got), want)

  # The same command again: the finished run resumes at its end and evaluates test again.
  _same(loop.train(config, workdir=moved), metrics)

  # Another answer head is refused by name: evaluating a generative run with
  # --config.model.head=classifier asked for a num_answers that could not help.
  with pytest.raises(ValueError, match="model.head='generative', but --config.model.head "
                                       "says 'classifier'"):
    run_lib.restore(moved, overrides={"model.head": "classifier"})
  with pytest.raises(ValueError, match=r"--config.data.nope: the run's config has no such"):
    run_lib.restore(moved, overrides={"data.nope": 1})
  # Misspelt, not left out as a training setting the evaluation does not read (the user
  # meant train.eval_batch_size, and would believe it set).
  with pytest.raises(ValueError, match=r"--config.train.eval_batchsize: the run's config has "
                                       "no such field"):
    run_lib.restore(moved, overrides={"train.eval_batchsize": 8})
  # eval.py's --fsdp shards the restored parameters: a split the devices do not allow is
  # refused (it was once left at 1, whatever was asked).
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf"{n} devices cannot be split {n + 1}-way for FSDP"):
    run_lib.restore(moved, fsdp=n + 1)
  # The protocol is asked for with closed_set (--closed_set); as a config override it was
  # printed as taken, and the evaluation stayed open-set.
  with pytest.raises(ValueError, match=r"--config.data.closed_set: .* unless asked with "
                                       r"--closed_set"):
    run_lib.restore(moved, overrides={"data.closed_set": True})
  # Data whose held-out slice is not the run's (here a larger one, holding examples the run
  # trained on) are refused; the overrides taken are listed.
  other = run_lib.restore(moved, overrides={"data.val_fraction": 0.1, "data.dir":
                                            config.data.dir})
  assert other.changes == ["data.val_fraction 0.03 -> 0.1"]
  with pytest.raises(ValueError, match=r"the data are not the run's: it trained on \d+ "
                                       r"examples and validated on \d+"):
    run_lib.evaluate_split(other, "validation")
  # Overrides an evaluation does not read are left out with a warning, not listed among the
  # changes its metrics are filed with (they were, and changed nothing).
  unused = {"train.fsdp": 2, "optim.lr": 1.0, "seed": 3, "model.dropout": 0.5,
            "model.text.tokenizer": "/nowhere", "model.text.checkpoint": "/nowhere"}
  with caplog.at_level("WARNING"):
    taken = run_lib.restore(moved, overrides={**unused, "train.eval_batch_size": 8})
  assert taken.changes == ["train.eval_batch_size 64 -> 8"]
  for field in unused:
    assert f"--config.{field}: not used by an evaluation (" in caplog.text, field
  assert "eval.py's --fsdp" in caplog.text
  # eval.py: the config file only names the overrides' fields; the rest is the run's (the
  # demo config's own val_fraction, 0.1, and answer_max_len were used before: another slice,
  # other candidates). Its validation is the one above.
  out = subprocess.run([sys.executable, "launch/eval.py", f"--checkpoint_dir={moved}",
                        "--split=validation", "--config=configs/demo.py",
                        "--config.train.eval_batch_size=8", f"--out={tmp_path / 'cli'}"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "the run's config, with:\n  train.eval_batch_size 64 -> 8\n" in out.stderr
  cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
  assert cli.pop("config_changes") == ["train.eval_batch_size 64 -> 8"]  # Filed with them.
  assert cli["run"] == str(moved)
  _same(cli, val)
  # --step and --fsdp reach the restore: a step the run did not save, a split the devices
  # cannot hold, are refused.
  for flag, message in (("--step=99", "no checkpoint of step 99 in"),
                        (f"--fsdp={jax.device_count() + 1}", "cannot be split")):
    out = subprocess.run([sys.executable, "launch/eval.py", f"--checkpoint_dir={moved}", flag,
                          f"--out={tmp_path / 'cli-refused'}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 1 and message in out.stderr, (flag, out.stderr[-3000:])
  # A run folder without its tokenizer copy (only checkpoints/ moved): the config's
  # tokenizer, with a warning saying so.
  shutil.rmtree(moved / ckpt_lib.TOKENIZER)
  gone.rename(text_checkpoint)
  with caplog.at_level("WARNING"):
    run_lib.restore(moved)
  assert f"{moved} has no tokenizer/ folder (the tokenizer the run saved)" in caplog.text
  # ... and checked against the run's record: another vocabulary (here "yes" and "no" swapped)
  # answered with other token ids, silently.
  other = tmp_path / "other-vocab"
  other.mkdir()
  shutil.copy(text_checkpoint / "tokenizer_config.json", other)
  words = (text_checkpoint / "vocab.txt").read_text().split("\n")
  yes, no = words.index("yes"), words.index("no")
  words[yes], words[no] = "no", "yes"
  (other / "vocab.txt").write_text("\n".join(words))
  with pytest.raises(ValueError, match=rf"the tokenizer in {other}, which the config names, is "
                     r"not the one the run was trained with \(its fingerprint is \w+, the run "
                     rf"recorded \w+\): copy the run's tokenizer/ folder into {moved}"):
    run_lib.restore(moved, overrides={"model.text.tokenizer": str(other)})


def test_a_resumed_run_says_which_changed_fields_it_keeps_from_its_record(text_checkpoint,
                                                                          tmp_path):
  """A resumed run builds its checkpoint towers from the architectures it recorded and reads
  its own tokenizer copy: changes to those fields are listed as not applying, the others as
  taken. A tower from scratch is built from the config, so its arch changes are taken."""
  config = _config(text_checkpoint, tmp_path)
  saved = config.to_json()
  config.model.text.checkpoint = "/moved/bert"
  config.model.text.arch.depth = 1
  config.model.text.tokenizer = "/other/vocab"
  config.model.text.max_len = 24
  config.model.text.unused = ("pooler.*",)
  config.model.image.arch.depth = 3
  config.train.keep = 5
  taken, kept = loop.config_changes(saved, config, saved_tokenizer=True)
  assert kept == ["model.text.arch.depth (unset) -> 1",
                  f"model.text.checkpoint {str(text_checkpoint)!r} -> '/moved/bert'",
                  "model.text.tokenizer None -> '/other/vocab'",
                  "model.text.unused [] -> ['pooler.*']"]
  assert [line.split()[0] for line in taken] == [
      "model.image.arch.depth", "model.text.max_len", "train.keep"]
  # A run from before tokenizer copies were saved reads the tokenizer the config names.
  taken, kept = loop.config_changes(saved, config, saved_tokenizer=False)
  assert "model.text.tokenizer None -> '/other/vocab'" in taken


def test_a_record_older_than_a_config_field_reads_as_the_run_had_it(text_checkpoint, tmp_path):
  """A run recorded before model.rank_score and train.deterministic existed ran as ranking by
  likelihood and with XLA's default kernels: resumed under those values it lists no change
  (it listed "train.deterministic None -> False"), under others it lists them from what the
  run had. Another field the record lacks reads "(unset)", not None, which a field can be."""
  config = _config(text_checkpoint, tmp_path)
  record = json.loads(config.to_json())
  del record["model"]["rank_score"], record["train"]["deterministic"], record["train"]["keep"]
  assert config.model.rank_score == "likelihood" and config.train.deterministic is False
  taken, kept = loop.config_changes(json.dumps(record), config, saved_tokenizer=True)
  assert (taken, kept) == ([f"train.keep (unset) -> {config.train.keep!r}"], [])
  config.model.rank_score, config.train.deterministic = "first_token_twice", True
  taken, _ = loop.config_changes(json.dumps(record), config, saved_tokenizer=True)
  assert taken == ["model.rank_score 'likelihood' -> 'first_token_twice'",
                   "train.deterministic False -> True",
                   f"train.keep (unset) -> {config.train.keep!r}"]
  # A field the record has and the config lacks.
  record["train"]["gone"] = None
  taken, _ = loop.config_changes(json.dumps(record), config, saved_tokenizer=True)
  assert "train.gone None -> (unset)" in taken


def test_the_run_length_is_set_by_epochs_or_by_steps_not_both():
  """A config counting in epochs ignored --config.optim.total_steps without a word (a run
  "extended" that way was reported complete): both set to different lengths is refused."""
  from ml_collections import ConfigDict
  config = lambda epochs, steps: ConfigDict(dict(train=dict(epochs=epochs, batch_size=32),
                                                 optim=dict(total_steps=steps)))
  assert loop.total_steps(config(6, None), 2757) == 6 * 86
  assert loop.total_steps(config(0, 2000), 2757) == 2000
  assert loop.total_steps(config(6, 516), 2757) == 516  # The length the run records.
  with pytest.raises(ValueError, match=r"train.epochs=6 \(516 steps of 32\) and "
                     r"optim.total_steps=2000 both set the run's length: count in steps with "
                     r"--config.train.epochs=0, or in epochs with --config.optim.total_steps=0"):
    loop.total_steps(config(6, 2000), 2757)
  # Neither set: "the run has None steps".
  with pytest.raises(ValueError, match=r"the run's length is not set: set "
                     r"--config.optim.total_steps \(steps\) or --config.train.epochs"):
    loop.total_steps(config(0, None), 2757)


def test_a_second_training_in_a_run_folder_is_refused(tmp_path):
  """The same command run again before the first ended: both logged every step and one
  removed the other's checkpoint in progress. The folder is locked while a run trains in it;
  the lock goes when the run ends. A second run is refused before it builds its data and
  makes its model (it was refused after both: minutes, on a real model)."""
  import fcntl
  config = helpers.tiny_config()
  config.data.update(dir=str(tmp_path / "data"), val_fraction=0.03)
  config.optim.total_steps = 1
  workdir = tmp_path / "run"
  config.train.update(workdir=str(workdir), epochs=0, batch_size=16, tensorboard=False)
  workdir.mkdir()
  running = open(workdir / ".run-lock", "a")
  fcntl.flock(running, fcntl.LOCK_EX)  # A run training in the folder.
  with pytest.raises(ValueError, match=rf"{workdir}: another training run is using this "
                                       r"folder \(it holds \S+\.run-lock\): wait for it"):
    loop.train(config)
  assert sorted(p.name for p in workdir.iterdir()) == [".run-lock"]  # No checkpoint folder,
  assert not (tmp_path / "data").exists()  # no dataset built.
  running.close()
  with loop._RunLock() as first:
    first.hold(workdir)
    with pytest.raises(ValueError, match="another training run is using this folder"):
      loop._RunLock().hold(workdir)
  with loop._RunLock() as again:  # Released when the first ended.
    again.hold(workdir)


def test_every_unset_folder_is_named_at_once_before_anything_is_built(tmp_path):
  """`train.py --config=configs/vqa_rad.py` was refused for its work folder, then, run again,
  its data folder, then, after the dataset was built (minutes for PathVQA), its tokenizer
  and each tower checkpoint: one at a time. They are named in one message, first."""
  from configs import pretrain_stage1
  config = helpers.tiny_config()
  config.train.workdir = None
  config.data.update(dir=None, source_dir=str(tmp_path / "source"))
  for part, source in (("image", "hf_clip"), ("text", "hf_bert")):
    config.model[part].update(source=source, checkpoint=None)
  with pytest.raises(ValueError) as e:
    loop.train(config)
  assert str(e.value) == (
      "the config leaves unset what the run needs: set --config.train.workdir=/path/to/run "
      "(the work folder for checkpoints and logs); --config.data.dir=/path (the folder the "
      "dataset is built in, or was); --config.model.image.checkpoint=/path/to/folder (the vit "
      "tower loads a hf_clip checkpoint); --config.model.text.checkpoint=/path/to/folder (the "
      "bert tower loads a hf_bert checkpoint)")
  # Checked before the data is built (the source is not even read).
  config.train.workdir, config.data.dir = str(tmp_path / "run"), str(tmp_path / "data")
  with pytest.raises(ValueError, match=r"set --config.model.image.checkpoint=\S+ \(the vit "
                     r"tower loads a hf_clip checkpoint\); --config.model.text.checkpoint="):
    loop.train(config)
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
  # A randomly initialised text tower needs a tokenizer folder of its own.
  config.model.image.source = config.model.text.source = "init"
  config.model.text.tokenizer = ""
  with pytest.raises(ValueError, match=r"set --config.model.text.tokenizer=/path \(the text "
                     r"tower's tokenizer folder\)$"):
    loop.check_named(config)
  # A run being resumed reads its towers and tokenizer from its own folder.
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  loop.check_named(config)
  # Pre-training: the teacher's cache, and its checkpoints (read for its fingerprint).
  config = pretrain_stage1.get_config("image=tiny,text=tiny,teacher=tiny")
  config.train.workdir, config.data.dir = str(tmp_path / "new"), str(tmp_path / "data")
  config.teacher.update(mode="cache", cache=None)
  config.teacher.image.update(source="hf_clip", checkpoint=None)
  with pytest.raises(ValueError, match=r"set --config.teacher.cache=FILE \(built by `python "
                     r"launch/cache_teacher.py`; or --config.teacher.mode=online\); "
                     r"--config.teacher.image.checkpoint=/path/to/folder \(the vit tower "
                     r"loads a hf_clip checkpoint\)$"):
    loop.check_named(config)


def test_values_that_would_train_something_else_are_refused_by_flag(tmp_path):
  """Found by feeding every field nonsense: a negative loss weight dropped its term, epsilon 0
  made the OT loss 0, a label smoothing over 1 trained on negative targets, a negative weight
  decay grew the weights, answers of 2 tokens left the decoder nothing to learn; others failed
  inside a library, some with the run folder written."""
  import jax.numpy as jnp

  from medvqa_jax.train import optim
  from medvqa_jax.train import step as step_lib
  base = helpers.tiny_config()
  step_lib.check_values(base)  # The defaults pass.
  for field, value, message in (
      ("seed", -1, r"--config.seed=-1: must be a whole number in \[0, 2\*\*32\)"),
      # (A key from 2**32 holds seed 0's key data: seed 0's draws under another name.)
      ("seed", 2 ** 32, r"--config.seed=4294967296: must be a whole number in \[0, 2\*\*32\)"),
      ("train.epochs", -1, r"--config.train.epochs=-1: must be 0 or more"),
      ("model.dropout", 1.5, r"--config.model.dropout=1.5: must be in \[0, 1\)"),
      ("model.dtype", "int8", r"--config.model.dtype='int8': must be float32, bfloat16 or "),
      ("model.text.max_len", 1, r"--config.model.text.max_len=1: must be 2 or more"),
      ("model.prior_max_tokens", 0, r"--config.model.prior_max_tokens=0: must be 1 or more"),
      ("model.answer_max_len", 2, r"--config.model.answer_max_len=2: must be 3 or more "
       r"\(\[CLS\], a word piece, \[SEP\]\)"),
      ("model.rank_score", "albef", r"--config.model.rank_score='albef': must be one of "
       r"likelihood, first_token_twice"),
      ("losses.weights.wpa", -1.0, r"--config.losses.weights.wpa=-1.0: must be 0 or more"),
      ("losses.label_smoothing", 1.5, r"--config.losses.label_smoothing=1.5: must be in"),
      ("losses.ot.epsilon", 0.0, r"--config.losses.ot.epsilon=0.0: must be above 0"),
      ("losses.ot.solver", "foo", r"--config.losses.ot.solver='foo': must be 'sinkhorn' or"),
      ("losses.ot.ipot_iterations", 0, r"--config.losses.ot.ipot_iterations=0: must be 1 or"),
  ):
    bad = base.copy_and_resolve_references()
    *path, name = field.split(".")
    node = bad
    for part in path:
      node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=message):
      step_lib.check_values(bad)
  # A weight naming no term, misspelt in a config file (the command line refuses a field the
  # config lacks), was ignored: the term it meant was left out.
  bad = base.copy_and_resolve_references()
  with bad.unlocked():
    bad.losses.weights.algn = 1.0
  with pytest.raises(ValueError, match=r"--config.losses.weights.algn=1.0: must be the weight "
                     r"of a loss term, and there is no term 'algn' \(terms: itgc, imvc, utgc"):
    step_lib.check_values(bad)
  # A classifier head has no answer tokens: their length is not its concern.
  other = base.copy_and_resolve_references()
  other.model.update(head="classifier", answer_max_len=1)
  step_lib.check_values(other)
  # Refused by the loop before anything is written.
  bad = base.copy_and_resolve_references()
  bad.losses.label_smoothing = 1.5
  bad.train.workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="label_smoothing=1.5"):
    loop.train(bad)
  assert not (tmp_path / "run").exists()
  # The optimizer's own: a negative decay, or a decay rate of 1 (NaN parameters).
  for field, value in (("weight_decay", -1.0), ("b1", 1.0), ("b2", -0.1)):
    cfg = base.optim.copy_and_resolve_references()
    cfg.total_steps, cfg[field] = 10, value
    with pytest.raises(ValueError, match=rf"optim.{field}={value}: must be"):
      optim.make(cfg, {"w": jnp.zeros(3)})


def _short_run(tmp_path, steps: int, save_every: int, eval_every: int):
  """(config, run folder) of a tiny fine-tuning run of `steps` steps on part of the demo."""
  config = helpers.tiny_config()
  config.model.answer_max_len = 8
  config.data.update(dir=str(tmp_path / "data"), val_fraction=0.03,
                     source_dir=str(helpers.demo_part(tmp_path / "source")))
  config.optim.total_steps = steps
  workdir = tmp_path / "run"
  config.train.update(workdir=str(workdir), epochs=0, batch_size=16, save_every=save_every,
                      eval_every=eval_every, keep=5, tensorboard=False)
  return config, workdir


def test_the_best_step_is_tested_and_a_resumed_run_goes_on_from_its_latest(tmp_path,
                                                                          monkeypatch):
  """A fine-tuning run whose best validation is not its last: the test answers come from the
  best step's parameters (not the latest's, under the best one's name); a run length that is
  no multiple of eval_every validates its last step too; a resume starts at the latest step,
  not the best, and holds the folder's lock as a new run does."""
  from medvqa_jax.evaluate import vqa as vqa_eval
  config, workdir = _short_run(tmp_path, steps=5, save_every=2, eval_every=2)
  evaluate = vqa_eval.evaluate

  def step_2_validates_best(rows, split, protocol, step, **kw):
    m = evaluate(rows, split, protocol, step, **kw)
    if "baseline" not in kw:  # A validation (the test passes its baseline).
      m["overall"] = 0.9 if step == 2 else 0.1
    return m
  monkeypatch.setattr(vqa_eval, "evaluate", step_2_validates_best)
  metrics = loop.train(config)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4, 5]
  assert metrics["step"] == 2
  saved = ckpt_lib.Checkpoints(workdir / "checkpoints", read_only=True)
  # Scheduled saves, none a stop's (which the keep policy would drop once a later step is).
  assert saved.steps() == [2, 4, 5]
  assert not any(saved.run_record(s).get("stop") for s in saved.steps())
  saved.close()
  tested = [json.loads(line)["score"] for line in
            (workdir / "eval" / "test" / "predictions.jsonl").read_text().splitlines()]
  restored = run_lib.restore(workdir)  # No step: the best on validation, as eval.py's default.
  assert restored.step == 2
  run_lib.evaluate_split(restored, "test", out_dir=tmp_path / "step2")
  step_2 = [json.loads(line)["score"] for line in
            (tmp_path / "step2" / "predictions.jsonl").read_text().splitlines()]
  assert tested == step_2
  config.optim.total_steps = 7
  with loop._RunLock() as other:  # Another training holds the folder: refused.
    other.hold(workdir)
    with pytest.raises(ValueError, match="another training run is using this folder"):
      loop.train(config)
  loop.train(config)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  trained = [r["step"] for r in records if "loss" in r]
  assert trained == sorted(set(trained)) and trained[-1] == 7 and 6 in trained


def test_logs_reach_the_disk_before_each_save_and_pauses_leave_the_rate(tmp_path,
                                                                         monkeypatch):
  """Saved every step, validated at the last: every step logged is in metrics.jsonl before
  its checkpoint is written (a run killed after a save resumes past those steps and never
  logs them again), even where no validation flushed the log. Each pause to validate or
  save is left out of the reported rate. The test's majority baseline is the training
  answers' (the records training read, not the test's)."""
  from medvqa_jax.data import splits as splits_lib
  from medvqa_jax.train import observe
  config, workdir = _short_run(tmp_path, steps=3, save_every=1, eval_every=3)
  logged, save = {}, ckpt_lib.Checkpoints.save

  def saving(self, step, *args, **kwargs):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    logged[step] = [r["step"] for r in map(json.loads, lines) if "loss" in r]
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ckpt_lib.Checkpoints, "save", saving)
  made, training_splits = [], loop.training_splits
  monkeypatch.setattr(loop, "training_splits",
                      lambda c: made.append(training_splits(c)) or made[-1])
  majority = helpers.count_calls(monkeypatch, splits_lib, "majority_answer")
  paused = helpers.count_calls(monkeypatch, observe.Reporter, "exclude")
  loop.train(config)
  assert logged == {1: [1], 2: [1, 2], 3: [1, 2, 3]}
  assert len(paused) == 3 and all(args[1] > 0 for args, _ in paused)  # (self, seconds)
  ((args, _),) = majority
  assert args[0] is made[0][0]["train"].records
