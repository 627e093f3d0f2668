"""Pre-training through the loop: the teacher's embeddings from the cache (refused when it
was made for other data or by another teacher) or computed online; validation on the
held-out slice."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import helpers
from medvqa_jax import ASSETS
from medvqa_jax.losses import teacher as teacher_lib
from medvqa_jax.train import loop, teacher_feed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A captions_jsonl corpus over the bundled sample images (captions: their questions)."""
  folder = tmp_path_factory.mktemp("corpus")
  helpers.write_jsonl(folder / "train.jsonl", helpers.sample_caption_rows())
  return folder


def _config(corpus, data_dir, workdir, val_fraction=0.0, **teacher):
  from configs import pretrain_stage1
  config = pretrain_stage1.get_config("image=tiny,text=tiny,teacher=tiny")
  vocab = str(ASSETS / "bert_uncased_vocab")
  config.model.text.update(tokenizer=vocab, max_len=16)
  config.teacher.text.tokenizer = vocab
  config.teacher.logit_scale = 50.0
  config.teacher.update(teacher)
  config.model.fusion.update(width=64, layers=1, heads=4, mlp_dim=128)
  # Stored shrunk below the sample images' 112 px: what reads a run's images reads them so.
  config.data.update(name="captions_jsonl", dir=str(data_dir), source_dir=str(corpus),
                     val_fraction=val_fraction, max_side=48)
  config.optim.total_steps = 2
  config.train.update(workdir=str(workdir), batch_size=4, save_every=2, eval_every=2,
                      tensorboard=False)
  return config


def _cache(config, path, change_caption=False):
  from medvqa_jax.data import splits as splits_lib
  splits_lib.ensure_built(config.data)
  records = teacher_lib.DatasetRecords(config.data.dir, config.data.name)
  if change_caption:
    records = records[:]  # Read into a list (DatasetRecords reads each when asked), edited.
    records[3]["caption"] += " (edited)"
  teacher = teacher_lib.from_config(config)
  teacher_lib.compute_cache(teacher, records, batch_size=8, progress=False).save(path)
  return path


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def test_training_reads_the_cache_and_refuses_one_that_does_not_match(corpus, tmp_path,
                                                                      capsys, caplog):
  data = tmp_path / "tfds"
  good = _cache(_config(corpus, data, tmp_path), tmp_path / "good.npz")
  other_data = _cache(_config(corpus, data, tmp_path), tmp_path / "other_data.npz",
                      change_caption=True)
  other_teacher = _cache(_config(corpus, data, tmp_path, logit_scale=60.0),
                         tmp_path / "other_teacher.npz")
  for cache, message in ((other_data, "computed for other data"),
                         (other_teacher, "computed by another teacher")):
    workdir = tmp_path / cache.stem
    with pytest.raises(ValueError, match=message):
      loop.train(_config(corpus, data, workdir, cache=str(cache)))
    assert not workdir.exists()  # Refused before anything was written.
  with pytest.raises(ValueError, match="teacher.cache"):
    loop.train(_config(corpus, tmp_path / "unbuilt", tmp_path / "none"))
  assert not (tmp_path / "unbuilt").exists()  # Refused before the dataset was built.

  cached = tmp_path / "cached"
  capsys.readouterr()
  assert loop.train(_config(corpus, data, cached, cache=str(good))) == {}
  # Stage 1's encoders are frozen: random ones are pointed out. No validation: the latest.
  assert ("pre-training done: step 2 (no validation: the latest) of 2, in "
          f"{cached / 'checkpoints'}") in capsys.readouterr().out
  for part in ("image", "text"):
    assert f"the {part} tower is frozen (optim.lr_mults) but randomly initialised" in caplog.text
  online = tmp_path / "online"
  loop.train(_config(corpus, data, online, mode="online"))
  a, b = _losses(cached), _losses(online)
  assert [r["step"] for r in a] == [1, 2]
  for ra, rb in zip(a, b):  # The same embeddings, from the file or computed in the run.
    for term in ("itgc", "imvc", "utgc", "wpa", "itm", "loss"):
      assert np.isfinite(ra[term])
      np.testing.assert_allclose(ra[term], rb[term], rtol=1e-4, err_msg=term)
  # And without a teacher the global terms are hard-label InfoNCE: other values.
  assert "utgc" not in caplog.text
  plain = tmp_path / "plain"
  loop.train(_config(corpus, data, plain, mode="none"))
  assert abs(_losses(plain)[0]["itgc"] - a[0]["itgc"]) > 1e-3
  # utgc has no hard-label form: its weight, set, is said to be unused.
  assert "utgc" not in _losses(plain)[0]
  assert "losses.weights.utgc=1.0 is not used" in caplog.text
  assert (cached / "checkpoints" / "2").is_dir()
  # Read without a step: the latest, and said to be so (it said nothing of it).
  from medvqa_jax.evaluate import run as run_lib
  caplog.clear()
  assert run_lib.restore(cached).step == 2
  assert (f"no step in {cached / 'checkpoints'} has a finite validation metric: reading the "
          "latest, step 2") in caplog.text
  caplog.clear()
  run_lib.restore(cached, step=2)  # Named: nothing to say.
  assert "validation metric" not in caplog.text


def test_pretraining_validates_on_the_held_out_slice(corpus, tmp_path, capsys, caplog):
  """Half of the 8 examples held out: one validation batch of 4 at every step; the cache made
  for the whole corpus serves both parts; the best checkpoint is the lowest validation loss."""
  data, workdir = tmp_path / "tfds", tmp_path / "run"
  cache = _cache(_config(corpus, data, tmp_path), tmp_path / "cache.npz")
  small = tmp_path / "small"  # 2 held-out examples, less than a batch: refused, nothing written.
  with pytest.raises(ValueError, match="val_fraction"):
    loop.train(_config(corpus, data, small, val_fraction=0.25, cache=str(cache)))
  assert not small.exists()
  config = _config(corpus, data, workdir, val_fraction=0.5, cache=str(cache))
  config.optim.total_steps = 3
  config.train.update(eval_every=1, save_every=1, keep=1)
  assert loop.train(config) == {}
  rows = [r for r in _losses(workdir) if "val_loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    for term in ("loss", "itgc", "imvc", "utgc", "wpa", "itm"):
      assert np.isfinite(r[f"val_{term}"]), term
    assert r["val_examples"] == 4
    assert 0 <= r["val_i2t_r1"] <= r["val_i2t_r5"] == r["val_t2i_r5"] == 1.0  # 4 candidates.
  assert len({r["val_loss"] for r in rows}) == 3  # The parameters moved between validations.
  best = min(rows, key=lambda r: r["val_loss"])["step"]
  kept = {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
  assert kept == {3, best}  # The latest (keep=1) and the best on validation.
  # The run says where its best checkpoint is and how the next stage starts from it; run
  # again, it says it is complete.
  printed = capsys.readouterr().out
  val_loss = next(r["val_loss"] for r in rows if r["step"] == best)
  assert (f"pre-training done: best on validation step {best} (val_loss {val_loss:.4f}) of 3, "
          f"in {workdir / 'checkpoints'}; the next stage starts from it with "
          f"--config.train.init_from={workdir}") in printed
  assert loop.train(config) == {}
  assert "the run is complete (step 3 of 3)\n" in capsys.readouterr().out

  # eval.py's restore repeats the validation of a saved step: the same inputs every time.
  from medvqa_jax.evaluate import run as run_lib
  caplog.clear()
  restored = run_lib.restore(workdir)  # The best step by default.
  assert restored.step == best and "validation metric" not in caplog.text
  again = run_lib.evaluate_split(restored)
  recorded = next(r for r in rows if r["step"] == best)
  for k, v in recorded.items():
    if k != "step":
      np.testing.assert_allclose(again[k], v, rtol=1e-5, err_msg=k)
  saved = json.loads((workdir / "eval" / f"validation-step{best}" / "metrics.json").read_text())
  assert saved["val_loss"] == again["val_loss"] and saved["step"] == best
  splits, _, _ = loop.training_splits(config)
  val_ids = [r["id"] for r in splits["val"].records]
  assert not set(val_ids) & {r["id"] for r in splits["train"].records}
  with pytest.raises(ValueError, match="--split=validation"):
    run_lib.evaluate_split(restored, "test")

  # embed.py embeds with the run's global embeddings (its best step): those of the model's own
  # pre-training pass on the images as built (data.max_side, 48) and the questions as read.
  rows = list({r["image"]: r for r in helpers.sample_caption_rows()}.values())[:2]
  out = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "embed.py"), f"--checkpoint_dir={workdir}"]
      + [f"--image={r['image']}" for r in rows] + [f"--question={r['caption']}" for r in rows],
      capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "fine-tuning run" not in out.stderr  # Its embeddings are what it trained.
  embedded = json.loads(out.stdout)
  assert (embedded["step"], embedded["checkpoint_dir"]) == (best, str(workdir))
  from medvqa_jax.data import augment, builders
  from medvqa_jax.data import text as text_lib
  from medvqa_jax.models.amif import AMiF
  pixels = np.stack([augment.resize(np.asarray(builders.read_as_built(
      r["image"], config.data.max_side)), restored.model.image.image_size) for r in rows])
  batch = restored.tokenizer([text_lib.question(r["caption"]) for r in rows])
  ref = jax.jit(lambda p, *x: restored.model.apply({"params": p}, *x, fuse=False,
                                                   method=AMiF.pretrain))(
      restored.params, pixels, batch["input_ids"], batch["attention_mask"])
  cosine = np.asarray(ref["image_embed"], np.float64) @ np.asarray(ref["text_embed"]).T
  np.testing.assert_allclose(embedded["cosine_image_x_question"], cosine, atol=2e-4)
  assert embedded["image_tokens"][0] == embedded["question_tokens"][0] == 2
  # predict.py answers questions with a fine-tuned run: this one is refused by name.
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "predict.py"),
                        f"--checkpoint_dir={workdir}", f"--image={rows[0]['image']}",
                        "--question=is there a fracture?", "--out="],
                       capture_output=True, text=True)
  assert out.returncode == 1 and not out.stdout
  assert out.stderr.startswith(f"error: {workdir} is a pre-training run: it has no answer head")


def test_a_run_and_its_cache_evaluate_and_resume_without_the_teacher(corpus, tmp_path,
                                                                       monkeypatch):
  """The run records its teacher's fingerprint: evaluating or resuming checks the cache against
  it, so the teacher's checkpoint is not read (a run folder and its cache move to a machine
  without it); a teacher changed since is loaded, and its cache checked against it."""
  from medvqa_jax.evaluate import run as run_lib
  data, workdir = tmp_path / "tfds", tmp_path / "run"
  cache = str(_cache(_config(corpus, data, tmp_path), tmp_path / "cache.npz"))
  config = _config(corpus, data, workdir, val_fraction=0.5, cache=cache)
  assert loop.train(config) == {}
  fingerprint = teacher_lib.from_config(config).fingerprint()
  other = str(_cache(_config(corpus, data, tmp_path, logit_scale=60.0), tmp_path / "other.npz"))
  from medvqa_jax.train import checkpoint as ckpt_lib
  assert ckpt_lib.Checkpoints(workdir / "checkpoints", read_only=True).run_record(2)[
      "teacher"] == fingerprint

  def absent(_):
    raise FileNotFoundError("the teacher's checkpoint is not on this machine")
  monkeypatch.setattr(teacher_lib, "from_config", absent)
  restored = run_lib.restore(workdir)
  assert np.isfinite(run_lib.evaluate_split(restored)["val_loss"])
  # Another held-out slice would hold examples the run trained on: refused.
  with pytest.raises(ValueError, match=r"the data are not the run's: it trained on 4 examples "
                                       r"and validated on 4, and the data now give 2 and 6"):
    run_lib.evaluate_split(run_lib.restore(workdir, {"data.val_fraction": 0.75}))
  config.optim.total_steps = 3  # Resumed from step 2.
  assert loop.train(config) == {}
  assert [r["step"] for r in _losses(workdir) if "val_loss" not in r][-1] == 3
  # The cache file is no part of the teacher's identity: a copy elsewhere is checked too.
  moved = tmp_path / "moved.npz"
  moved.write_bytes(Path(cache).read_bytes())
  run_lib.evaluate_split(run_lib.restore(workdir, {"teacher.cache": str(moved)}))
  with pytest.raises(ValueError, match=r"other.npz was computed by another teacher \(.*\), not "
                                       r"the one this run was started with \(its record\)"):
    run_lib.evaluate_split(run_lib.restore(workdir, {"teacher.cache": other}))
  with pytest.raises(FileNotFoundError, match="not on this machine"):  # A changed teacher.
    run_lib.evaluate_split(run_lib.restore(workdir, {"teacher.logit_scale": 60.0}))
  monkeypatch.undo()
  config.teacher.logit_scale = 60.0
  config.optim.total_steps = 4
  with pytest.raises(ValueError, match="computed by another teacher"):
    loop.train(config)
  # Asked to answer questions (predict.py), it is refused before anything is restored.
  monkeypatch.setattr(ckpt_lib.Checkpoints, "restore_params", lambda *a, **k: 1 / 0)
  with pytest.raises(ValueError, match=r"run is a pre-training run: it has no answer head"):
    run_lib.restore(workdir, answering=True)


def test_resuming_refuses_a_run_whose_data_changed(corpus, tmp_path):
  """Resumed on other examples (here: a validation slice held out of the training split) a
  run would not continue itself: refused before anything is written; the same data resume."""
  data, workdir = tmp_path / "tfds", tmp_path / "run"
  cache = str(_cache(_config(corpus, data, tmp_path), tmp_path / "cache.npz"))
  assert loop.train(_config(corpus, data, workdir, cache=cache)) == {}  # Steps 1-2, saved at 2.
  files = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns)
                   for p in workdir.rglob("*") if p.is_file()}
  before = files()
  changed = _config(corpus, data, workdir, val_fraction=0.5, cache=cache)
  changed.optim.total_steps = 3
  with pytest.raises(ValueError, match=r"training data changed .*then 8 training and 0 "
                                       r"validation examples in batches of 4, now 4 and 4"):
    loop.train(changed)
  assert files() == before
  larger = _config(corpus, data, workdir, cache=cache)  # Step 2 would be other examples.
  larger.train.batch_size, larger.optim.total_steps = 8, 3
  with pytest.raises(ValueError, match=r"batch size changed .*in batches of 4, now 8 and 0 "
                                       r"in batches of 8"):
    loop.train(larger)
  assert files() == before
  reseeded = _config(corpus, data, workdir, cache=cache)  # The rest of the epoch reshuffled.
  reseeded.seed, reseeded.optim.total_steps = 1, 3
  with pytest.raises(ValueError, match=r"started with seed 0, not 1: .*--config.seed=0"):
    loop.train(reseeded)
  assert files() == before
  redrawn = _config(corpus, data, workdir, cache=cache)  # Other dropout masks from here on.
  redrawn.train.rng, redrawn.optim.total_steps = "rbg", 3
  with pytest.raises(ValueError, match=r"started with train.rng='threefry', not 'rbg': .*"
                                       r"--config.train.rng=threefry"):
    loop.train(redrawn)
  assert files() == before
  same = _config(corpus, data, workdir, cache=cache)
  same.optim.total_steps = 3
  assert loop.train(same) == {}
  assert [r["step"] for r in _losses(workdir) if "loss" in r] == [1, 2, 3]


def test_the_recorded_teacher_is_the_runs_whatever_its_mode_or_cache_file():
  """A run trained with the online teacher and resumed from a cache (or the cache moved) has
  the same teacher: the fingerprint it recorded stands. Another teacher field does not."""
  import json

  import ml_collections
  teacher = dict(image="tiny", text="tiny", mode="online", cache=None, logit_scale=50.0)
  run = {"teacher": "abc123", "config": json.dumps({"teacher": teacher})}
  config = ml_collections.ConfigDict({"teacher": {**teacher, "mode": "cache",
                                                  "cache": "/elsewhere/cache.npz"}})
  assert teacher_feed.recorded_teacher(config, run) == "abc123"
  config.teacher.logit_scale = 60.0
  assert teacher_feed.recorded_teacher(config, run) is None
  config.teacher.logit_scale = 50.0
  assert teacher_feed.recorded_teacher(config, {**run, "teacher": None}) is None  # Older ones.
  assert teacher_feed.recorded_teacher(config, None) is None
