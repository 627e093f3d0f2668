"""The main job end to end, as a user runs it: launch/train.py on the demo config (shortened,
on a part of its data: `helpers.demo_part`) on 8 fake CPU devices; resume after SIGKILL;
eval.py onto 1 device; NaN stop; two processes x 2 devices with jax.distributed (the same
global batch, split over 4 devices of 2 hosts). Each run is a subprocess (device counts are
per process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import helpers

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE = 8, 4


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = helpers.xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _train_cmd(workdir, data, *extra, steps=STEPS, log_every=4) -> list[str]:
  """The demo's command, shortened; `data` holds the source (`source`) and the build."""
  return [sys.executable, str(ROOT / "launch" / "train.py"), "--config=configs/demo.py",
          f"--config.train.workdir={workdir}", f"--config.data.dir={data / 'tfds'}",
          f"--config.data.source_dir={data / 'source'}",
          "--config.train.epochs=0", f"--config.optim.total_steps={steps}",
          f"--config.train.save_every={SAVE}", f"--config.train.eval_every={SAVE}",
          "--config.train.batch_size=16", f"--config.train.log_every={log_every}",
          "--config.data.val_fraction=0.03",
          # The recipe's dropout (the demo has none): resuming and the two-process run then
          # also reproduce its random draws.
          "--config.model.dropout=0.1",
          # Shorter answers, fewer re-ranked candidates and a shorter answer prior (cut, with a
          # warning): the same code paths at a third less time (re-ranking dominated).
          "--config.model.answer_max_len=8", "--config.model.rank_k=4",
          "--config.model.prior_max_tokens=128", *extra]


def _run(cmd, devices=8, check=True, **kw):
  out = subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                       timeout=900, **kw)
  if check and out.returncode != 0:
    raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-6000:]}")
  return out


def _params(workdir, step):
  """The saved params of a step, as NumPy (restored on this process's one device)."""
  from medvqa_jax.models.state_dict import flatten
  from medvqa_jax.train.checkpoint import Checkpoints
  ckpts = Checkpoints(Path(workdir) / "checkpoints", read_only=True)
  params = ckpts.restore_params(step, ckpts.saved_params(step))
  ckpts.close()
  return {k: np.asarray(v) for k, v in flatten(params).items()}


def _metrics(workdir) -> dict:
  m = json.loads((Path(workdir) / "eval" / "test" / "metrics.json").read_text())
  m.pop("seconds")
  return m


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The demo data's part the runs read (`source`), and the folder they build it in."""
  data = tmp_path_factory.mktemp("data")
  helpers.demo_part(data / "source")
  return data


def _test_records(data) -> list:
  return json.loads((data / "source" / "testset.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """The demo config, shortened, run straight through on 8 devices."""
  workdir = tmp_path_factory.mktemp("straight")
  out = _run(_train_cmd(workdir, data_dir))
  return workdir, out


def _event_scalars(path: Path) -> dict:
  """Tags -> values of a TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  data, pos, tags = path.read_bytes(), 0, {}
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for v in event.summary.value:
      tags.setdefault(v.tag, []).append(v.simple_value)
  return tags


def test_demo_runs_end_to_end(straight, data_dir):
  workdir, out = straight
  records = _test_records(data_dir)
  n = len(records)
  types = Counter(r["answer_type"] for r in records)
  # The README's main command prints the metrics next to the majority baseline.
  assert "majority" in out.stdout and "overall" in out.stdout
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  m = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
  assert summary["overall"] == m["overall"]
  assert m["questions"] == n and m["split"] == "test"
  assert m["protocol"].startswith("open-set")
  assert types.keys() == {"CLOSED", "OPEN"}
  for kind, count in types.items():
    assert m["by_answer_type"][kind]["questions"] == count
  assert m["by_yes_no"]["closed"]["questions"] + m["by_yes_no"]["open"]["questions"] == n
  assert sum(v["questions"] for v in m["by_question_type"].values()) == n
  assert m["majority_baseline"]["answer"] in ("no", "yes")
  # Answering a split reports progress: at least its end, for validation and test.
  assert re.search(r"validation at step \d+: \d+/\d+", out.stderr)
  assert f"test (step {m['step']}): {n}/{n}" in out.stderr
  # The records name the device count (a resume on another one is noted).
  from medvqa_jax.train.checkpoint import Checkpoints
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  assert ckpts.run_record(m["step"])["devices"] == 8
  ckpts.close()
  # The step tested, and why: the best validation among the steps kept.
  val = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  chosen = {r["step"]: r["val_accuracy"] for r in val if "val_accuracy" in r}[m["step"]]
  assert (f"fine-tuning done: testing step {m['step']}, the best on validation (val_accuracy "
          f"{chosen:.4f}) of the saved steps [") in out.stdout
  rows = [json.loads(line) for line in
          (workdir / "eval" / "test" / "predictions.jsonl").read_text().splitlines()]
  assert sorted(r["qid"] for r in rows) == sorted(str(r["qid"]) for r in records)
  assert all(0 < r["score"] <= 1 for r in rows)
  assert {"qid", "question", "answer", "prediction", "score", "protocol"} <= set(rows[0])
  assert sum(r["correct"] for r in rows) / n == pytest.approx(m["overall"])
  # Every step logged as JSON, validation at each save, TensorBoard scalars.
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in lines if "loss" in r]
  assert train_steps == list(range(1, STEPS + 1))
  assert [r["step"] for r in lines if "val_accuracy" in r] == list(range(SAVE, STEPS + 1, SAVE))
  (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
  scalars = _event_scalars(events)
  assert len(scalars["train/loss"]) == STEPS
  assert scalars["train/loss"] == pytest.approx([r["loss"] for r in lines if "loss" in r])
  assert len(scalars["val/accuracy"]) == STEPS // SAVE
  # The last `keep` (2) checkpoints, plus the best on validation.
  from medvqa_jax.train.checkpoint import Checkpoints
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  steps = ckpts.steps()
  best = ckpts.best_step()
  assert set(steps) == {STEPS - SAVE, STEPS, best}
  assert m["step"] == best
  ckpts.close()


def test_embedding_with_a_fine_tuning_run_says_its_embeddings_are_untrained(straight):
  """embed.py gave a fine-tuning run's similarities as those "its contrastive losses align":
  it has none, and its projections are not trained."""
  workdir, _ = straight
  out = _run([sys.executable, str(ROOT / "launch" / "embed.py"), f"--checkpoint_dir={workdir}",
              "--question=is the heart enlarged?"], devices=1)
  assert (f"warning: {workdir} is a fine-tuning run (generative head): no loss of it aligns "
          "these embeddings") in out.stderr, out.stderr[-3000:]
  assert json.loads(out.stdout)["question_tokens"][0] == 1


def test_a_run_shortened_below_its_latest_checkpoint_is_refused(straight, data_dir):
  # It was taken as complete ("step 8 of 6") and its best checkpoint, past the new length,
  # tested. Refused before anything is written.
  workdir, _ = straight
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  out = _run(_train_cmd(workdir, data_dir, steps=STEPS - 2), check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  assert (f"its latest checkpoint is step {STEPS}, past the run's length now ({STEPS - 2} "
          "steps: train.epochs or optim.total_steps lowered?)") in out.stderr
  assert f"launch/eval.py --checkpoint_dir={workdir} --step=N" in out.stderr
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_an_empty_step_folder_is_named_not_taken_for_a_longer_run(straight, tmp_path,
                                                                   data_dir):
  """An interrupted copy leaves an empty step folder past the run's last step: resuming said
  the run had been shortened; it names the unreadable step and what to do."""
  workdir = shutil.copytree(straight[0], tmp_path / "copied")
  (workdir / "checkpoints" / str(STEPS + 2)).mkdir()
  out = _run(_train_cmd(workdir, data_dir), check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "past the run's length" not in out.stderr
  assert (f"checkpoint step {STEPS + 2} in {workdir / 'checkpoints'} cannot be read") \
      in out.stderr, out.stderr[-3000:]
  assert (f"delete {workdir / 'checkpoints' / str(STEPS + 2)} to go on without it (a resumed "
          f"run goes on from the latest step left)") in out.stderr


def test_a_cut_array_file_is_one_error_not_pages_of_tracebacks(straight, tmp_path):
  """Orbax's abandoned reads of the other arrays printed thousands of lines of tracebacks
  (exceptions ignored in coroutines, "Event loop is closed", futures' exceptions never
  retrieved) around the one line saying what is wrong and what to do."""
  workdir = shutil.copytree(straight[0], tmp_path / "cut")
  step = workdir / "checkpoints" / str(STEPS)
  # Every data file: which of them hold the parameters (all eval.py reads) and which only the
  # optimizer state varies from save to save.
  victims = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert victims
  for victim in victims:
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 8])
  out = _run([sys.executable, str(ROOT / "launch" / "eval.py"), f"--checkpoint_dir={workdir}"],
             check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  assert f"checkpoint step {STEPS} in {workdir / 'checkpoints'} cannot be read" in out.stderr
  for noise in ("Event loop is closed", "Encountered error while reading", "never retrieved",
                "Exception ignored", "Traceback"):
    assert noise not in out.stdout + out.stderr, (noise, out.stderr[:3000])


def test_sigkill_and_resume_give_the_same_run(straight, tmp_path, data_dir):
  workdir = tmp_path / "killed"
  cmd = _train_cmd(workdir, data_dir)
  log = tmp_path / "killed.stderr"  # A file, not a pipe no one reads while the run goes on.
  with log.open("w") as stderr:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(8), stdout=subprocess.DEVNULL,
                            stderr=stderr)
  first = workdir / "checkpoints" / str(SAVE)
  deadline = time.time() + 600
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert first.exists(), log.read_text()[-3000:]
  done = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert done and done[-1] < STEPS, "the run finished before it was killed"
  # What the killed run recorded after its last checkpoint (plus a line cut short), taken
  # again by the resumed run: recorded once.
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"step": done[-1] + 1, "loss": -1.0}) + '\n{"step": 9')
  # What a save killed half-way leaves behind: never read as a checkpoint.
  half = workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1234567"
  (half / "state").mkdir(parents=True)
  (half / "state" / "garbage").write_bytes(b"\0" * 100)
  # Resumed with a changed field (one that does not change the run): named, and taken.
  out = _run(cmd + ["--config.train.keep=3"])
  assert f"resumed from {workdir / 'checkpoints'} step {done[-1]}" in out.stdout
  assert "the config differs from the one the run was started with" in out.stdout
  assert "\n  train.keep 2 -> 3\n" in out.stdout
  straight_dir, _ = straight
  a, b = _params(straight_dir, STEPS), _params(workdir, STEPS)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _metrics(workdir) == _metrics(straight_dir)
  assert _records(workdir) == _records(straight_dir)


def _records(workdir) -> list:
  """metrics.jsonl without its timings."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "samples_per_s" and not k.endswith("seconds")}
          for r in records]


def _children(pid: int) -> list[int]:
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.parent.name))
  return out


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _last_logged_step(workdir) -> int:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return max(r["step"] for r in lines if "loss" in r)


# Runs stopped by SIGTERM: with no periodic checkpoint, so that the one they hold is the step
# they reached, and signalled when they log step SIGNALLED, steps before their end. They log
# every step.
SIGNALLED = 2
NO_SAVES = ("--config.train.save_every=1000", "--config.train.eval_every=1000")


def _read_until(proc, text: str, timeout: float = 600, also=()) -> str:
  """proc's stderr up to the first line holding `text` (or its end). A run that prints
  neither within `timeout` seconds (hung: two processes once waited on each other under a
  loaded CPU) fails the test, killed with the processes `also`, rather than holding it, and
  the suite, for ever."""
  lines = []

  def read():
    for line in proc.stderr:
      lines.append(line)
      if text in line:
        return

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout)
  if reader.is_alive():
    for p in (proc, *also):
      p.kill()
    raise AssertionError(f"no {text!r} within {timeout} s; its stderr ends:\n"
                         + "".join(lines)[-3000:])
  return "".join(lines)


def test_sigterm_saves_the_step_reached_and_stops_cleanly(tmp_path, data_dir):
  """A scheduler's SIGTERM: the run finishes the step in progress and saves it (it held no
  checkpoint: the last was up to save_every steps back), finishes the checkpoint in flight,
  stops its input workers (they were left running, orphaned) and names the step to resume
  from. Every step is validated here: the stop's step is too, but that save, off the save
  schedule, does not compete for the best step (the run uninterrupted would not have saved
  it)."""
  workdir = tmp_path / "terminated"
  proc = subprocess.Popen(_train_cmd(workdir, data_dir, "--config.data.workers=1", *NO_SAVES,
                                     "--config.train.eval_every=1", log_every=1),
                          cwd=ROOT, env=_env(8), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  with helpers.reaped([proc]):
    before = _read_until(proc, f"step {SIGNALLED}/{STEPS}")
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    stderr = before + proc.communicate(timeout=300)[1]
  assert proc.returncode == 130, stderr[-3000:]
  assert workers, "the run had no input worker process"
  left = lambda: {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                  for p in workers if Path(f"/proc/{p}").exists()}
  for _ in range(50):
    if not left():
      break
    time.sleep(0.2)
  assert not left(), f"input workers left running: {left()}"
  saved = _checkpoint_steps(workdir)
  # The step reached is saved, and no step was trained after it.
  assert saved == [_last_logged_step(workdir)] and SIGNALLED <= saved[0] < STEPS, \
      stderr[-3000:]
  assert "SIGTERM: stopping after the step in progress" in stderr
  assert (f"interrupted: the latest checkpoint is step {saved[-1]} in "
          f"{workdir / 'checkpoints'}; run the same command again to resume") in stderr
  from medvqa_jax.train.checkpoint import Checkpoints
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(r["step"] == saved[0] and "val_accuracy" in r for r in lines)  # Validated,
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  assert ckpts.run_record(saved[0])["val"] == {}  # but not a candidate for the best,
  assert ckpts.run_record(saved[0])["stop"] is True  # nor among the last train.keep saves.
  ckpts.close()


def test_eval_restores_an_8_device_checkpoint_on_two_processes_and_on_1_device(straight,
                                                                               tmp_path,
                                                                               data_dir):
  workdir, _ = straight
  saved = _metrics(workdir)
  # Two processes (one device each) join, answer their shares, and process 0 prints and
  # writes the results the training run wrote on 8 devices (eval.py ran as unconnected
  # single processes).
  multi = tmp_path / "multi"
  outs = _two_processes([sys.executable, str(ROOT / "launch" / "eval.py"),
                         f"--checkpoint_dir={workdir}", f"--out={multi}"], devices=1)
  printed = json.loads(outs[0][0].strip().splitlines()[-1])
  written = json.loads((multi / "metrics.json").read_text())
  for m in (printed, written):
    m.pop("seconds", None)
    assert m.pop("run") == str(workdir)  # eval.py's name the run folder.
    assert m == saved
  assert not any(line.startswith("{") for line in outs[1][0].splitlines())
  rows = lambda folder: [json.loads(r) for r in
                         (folder / "predictions.jsonl").read_text().splitlines()]
  ours, trained = rows(multi), rows(workdir / "eval" / "test")
  # The same rows in the same order; scores to float32 rounding (other batch shapes).
  assert [dict(r, score=None) for r in ours] == [dict(r, score=None) for r in trained]
  np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in trained],
                             rtol=1e-4)
  # Closed-set candidates (here on 1 device): from every split, and every output says so, and
  # that the prior is the open-set run's (not the paper's protocol); by default in a folder of
  # its own, beside the open-set results.
  _run([sys.executable, str(ROOT / "launch" / "eval.py"), f"--checkpoint_dir={workdir}",
        "--closed_set"], devices=1)
  closed = workdir / "eval" / f"test-step{saved['step']}-closed-set"
  m = json.loads((closed / "metrics.json").read_text())
  from medvqa_jax.data import splits as splits_lib
  assert m["protocol"] == splits_lib.CLOSED_CANDIDATES
  assert m["questions"] == len(_test_records(data_dir))
  rows = (closed / "predictions.jsonl").read_text().splitlines()
  assert all(json.loads(r)["protocol"] == m["protocol"] for r in rows)


def test_init_from_another_run_then_an_infinite_gradient_stops_the_run(straight, tmp_path,
                                                                      data_dir):
  """One run on 1 device checks two things. It starts from the image tower of the straight
  run's checkpoint (saved on 8 devices): with a zero learning rate those parameters are still
  the source's at the step it took. Then an infinite gradient injected at the last step (a
  save step; the loss stays finite) stops it with a message naming the step, before that
  step's NaN parameters are saved or tested, and its last good checkpoint restores, finite.
  An init_from that holds no checkpoint is refused by name before the run folder is made."""
  from medvqa_jax.train.checkpoint import Checkpoints
  source, _ = straight
  nowhere = _run(_train_cmd(tmp_path / "refused", data_dir,
                            f"--config.train.init_from={tmp_path / 'nowhere'}"),
                 devices=1, check=False)
  assert nowhere.returncode == 1 and nowhere.stderr.startswith(
      f"error: --config.train.init_from: no checkpoint at {tmp_path / 'nowhere'}: no such "
      "folder (expected "
      "a run's work folder"), nowhere.stderr[-3000:]
  assert not (tmp_path / "refused").exists()
  # A tokenizer of the same size but another vocabulary (two words swapped): its text and
  # decoder parameters would pass the shape check and read other token ids. Refused.
  from medvqa_jax import ASSETS
  other = tmp_path / "other_vocab"
  shutil.copytree(ASSETS / "bert_uncased_vocab", other)
  words = (other / "vocab.txt").read_text().split("\n")
  a, b = words.index("cat"), words.index("dog")
  words[a], words[b] = words[b], words[a]
  (other / "vocab.txt").write_text("\n".join(words))
  swapped = _run(_train_cmd(tmp_path / "refused", data_dir, f"--config.train.init_from={source}",
                            f"--config.model.text.tokenizer={other}"), devices=1, check=False)
  assert swapped.returncode == 1 and (
      f"error: init_from {source}: its tokenizer ({source / 'tokenizer'}) has another "
      "vocabulary than this run's") in swapped.stderr, swapped.stderr[-3000:]
  assert not (tmp_path / "refused").exists()
  ckpts = Checkpoints(source / "checkpoints", read_only=True)
  best = ckpts.best_step()  # What init_from takes from a run folder, as evaluation does.
  ckpts.close()
  workdir = tmp_path / "nan"
  nan_step = STEPS
  out = _run(_train_cmd(workdir, data_dir, f"--config.train.init_from={source}",
                        "--config.train.init_params=image/.*", "--config.optim.lr=0.0",
                        f"--config.train.inject_nan_at={nan_step}"), devices=1, check=False)
  assert out.returncode == 3, out.stderr[-3000:]
  assert re.search(rf"initialised \d+ of \d+ parameter arrays \('image/\.\*'\) from "
                   rf"{re.escape(str(source / 'checkpoints'))} step {best}\n", out.stdout)
  # The step's loss was finite, its gradient not: it was not saved (NaN parameters).
  assert f"the gradient norm is inf at step {nan_step}" in out.stderr
  assert f"the last good checkpoint is step {SAVE}" in out.stderr
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [SAVE]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in lines if "loss" in r) == nan_step - 1
  ours, theirs = _params(workdir, SAVE), _params(source, best)
  assert all(np.isfinite(v).all() for v in ours.values())
  image = [k for k in ours if k.startswith("image/")]
  assert image and all(np.array_equal(ours[k], theirs[k]) for k in image)
  assert not np.array_equal(ours["fusion/text_layer_0/attn/query/kernel"],
                            theirs["fusion/text_layer_0/attn/query/kernel"])


def _start_two_processes(cmd, devices: int) -> list[subprocess.Popen]:
  """Starts `cmd` as the two processes of one multi-host run (`devices` each)."""
  return helpers.start_two_processes(cmd, _env(devices), ROOT)


def _two_processes(cmd, devices: int) -> list[tuple[str, str]]:
  """Runs `cmd` as the two processes of one multi-host run (`devices` each); both must
  succeed. Returns their (stdout, stderr)."""
  procs = _start_two_processes(cmd, devices)
  with helpers.reaped(procs):
    outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, e) in zip(procs, outs):
    assert p.returncode == 0, e[-5000:]
  return outs


def test_two_processes_reproduce_the_single_process_run(straight, tmp_path, data_dir):
  workdir = tmp_path / "multi"
  # 2 devices per process (not 4): the same multi-host paths, a third less time on 2 cores.
  _two_processes(_train_cmd(workdir, data_dir), devices=2)
  straight_dir, _ = straight
  # Within 1e-5 but for rounding-tipped elements (helpers.assert_params_close: here two of
  # the 8,192 of the GCA prior MLP's first kernel, a ReLU unit's column, 1.3e-5 apart), within
  # the steps' learning rates (demo: 1e-3, warmed up).
  helpers.assert_params_close(_params(workdir, STEPS), _params(straight_dir, STEPS), 1e-5,
                              STEPS * 1e-3)
  assert _metrics(workdir) == _metrics(straight_dir)


def test_sigterm_to_every_process_saves_the_step_they_agree_on(tmp_path, data_dir):
  """A scheduler stopping a multi-host run signals every process. JAX's runtime holds SIGTERM
  there (the run went on to its end); the processes now agree on a step, save it and stop."""
  workdir = tmp_path / "multi-terminated"
  # One device per process: with two, on jax 0.12.1 (Python 3.12) the processes' devices
  # deadlocked in a Gloo all-reduce of the first step each of the three times other tests
  # ran beside them (XLA's CPU runtime; the agreement tested here does not need them).
  procs = _start_two_processes(_train_cmd(workdir, data_dir, *NO_SAVES, log_every=1),
                               devices=1)
  with helpers.reaped(procs):
    before = _read_until(procs[0], f"step {SIGNALLED}/{STEPS}", also=procs[1:])
    for p in procs:
      p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
  outs[0] = (outs[0][0], before + outs[0][1])
  assert [p.returncode for p in procs] == [130, 130], outs[0][1][-3000:] + outs[1][1][-3000:]
  saved = _checkpoint_steps(workdir)
  assert saved == [_last_logged_step(workdir)] and SIGNALLED <= saved[0] < STEPS, \
      outs[0][1][-3000:]
  assert f"stop requested (SIGTERM): stopping with a checkpoint of step {saved[-1]}" in outs[0][0]
  for _, stderr in outs:
    assert f"interrupted: the latest checkpoint is step {saved[-1]} in " in stderr


def test_a_multi_host_run_into_a_locked_folder_is_refused_by_every_process(tmp_path, data_dir):
  """Process 0 finds the run folder locked by another training: every process refuses the
  run (the others would wait for process 0 in their first collective)."""
  import fcntl
  workdir = tmp_path / "locked"
  workdir.mkdir()
  running = open(workdir / ".run-lock", "a")
  fcntl.flock(running, fcntl.LOCK_EX)
  procs = _start_two_processes(_train_cmd(workdir, data_dir), devices=1)
  with helpers.reaped(procs):
    outs = [p.communicate(timeout=600) for p in procs]
  running.close()
  assert [p.returncode for p in procs] == [1, 1], outs[0][1][-3000:] + outs[1][1][-3000:]
  for _, stderr in outs:
    assert f"error: {workdir}: another training run is using this folder" in stderr
  assert sorted(p.name for p in workdir.iterdir()) == [".run-lock"]


def test_predict_prints_ranked_answers_and_writes_the_picture(straight, tmp_path):
  from PIL import Image

  from medvqa_jax import ASSETS
  workdir, _ = straight
  # A test question answers as eval.py answered it when the run ended (the step tested, the
  # best on validation; its predictions.jsonl): the answer, and its score up to rounding
  # (here float32; one question here, a batch on 8 devices there). The image is read as
  # evaluation reads it (not augmented as in training).
  tested = _metrics(workdir)["step"]
  row = json.loads((workdir / "eval" / "test" / "predictions.jsonl").read_text().splitlines()[0])
  (record,) = [r for r in json.loads((ASSETS / "vqa_rad_sample" / "testset.json").read_text())
               if str(r["qid"]) == row["qid"]]
  out = _run([sys.executable, str(ROOT / "launch" / "predict.py"), f"--checkpoint_dir={workdir}",
              f"--image={ASSETS / 'vqa_rad_sample' / 'images' / record['image_name']}",
              f"--question={row['question']}", "--out="], devices=1)
  answered = json.loads(out.stdout)
  best = answered["answers"][0]
  assert (answered["step"], best["answer"]) == (tested, row["prediction"]), (out.stdout, row)
  assert best["score"] == pytest.approx(row["score"], rel=1e-3), (out.stdout, row)
  # A question longer than the model reads is answered, with a warning. --step picks the
  # checkpoint (here the other one saved).
  other = ({SAVE, STEPS} - {tested}).pop()
  png = tmp_path / "answer.png"
  image_path = ASSETS / "vqa_rad_sample" / "images" / "synpic54610.jpg"
  question = " ".join(["is there a fracture"] * 10)
  out = _run([sys.executable, str(ROOT / "launch" / "predict.py"), f"--checkpoint_dir={workdir}",
              f"--image={image_path}", f"--question={question}", "--top=3",
              f"--out={png}", f"--step={other}"], devices=1)
  assert ("warning: the question takes 42 word pieces (its start and end pieces included); the "
          "model reads 24: the question cut to its first 22") in out.stderr
  result = json.loads(out.stdout)  # One JSON document: "wrote ..." goes to stderr.
  assert f"wrote {png}" in out.stderr and result["step"] == other
  scores = [a["score"] for a in result["answers"]]
  assert len(scores) == 3 and scores == sorted(scores, reverse=True)
  assert 0 < sum(scores) <= 1 + 1e-6  # Probabilities of distinct answers.
  from medvqa_jax.train.checkpoint import Checkpoints
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  vocab = ckpts.run_record(result["step"])["answers"]
  ckpts.close()
  assert all(a["answer"] in vocab for a in result["answers"])
  assert result["protocol"].startswith("open-set")
  with Image.open(png) as img:
    assert img.size[0] >= 768 and img.size[1] > 384
    got = np.asarray(img.convert("RGB"), np.int32)
  # The answers, their scores (to the 6 digits printed) and the picture are the model's, as
  # predict.py documents them, computed here: the attention of the last fusion layer (the demo
  # has 2), the gates' mean over channels. (The image as built: test_vqa_eval's classifier
  # run shrinks it.)
  import jax
  from medvqa_jax.data import builders, pipeline
  from medvqa_jax.evaluate import run as run_lib
  from medvqa_jax.evaluate import visualize
  from medvqa_jax.models.amif import AMiF
  r = run_lib.restore(workdir, step=other, answering=True)
  predictor = r.predictor()
  picture = builders.read_as_built(image_path, r.config.data.get("max_side"))
  example = pipeline._Example("vqa", r.tokenizer, r.model.image.image_size, "test")(
      {"id": "q", "image": np.asarray(picture), "question": question, "answers": [""]})
  inputs = [example[k][None] for k in ("images", "input_ids", "attention_mask")]
  prior = (predictor.prior_ids, predictor.prior_mask)
  fused = jax.jit(lambda v, *x: r.model.apply(v, *x, *prior, return_weights=True,
                                              method=AMiF.vqa))({"params": r.params}, *inputs)
  ranked = jax.jit(lambda v, *x: r.model.apply(
      v, *x, *prior, predictor.cand_ids, predictor.cand_mask, k=predictor.k,
      pack=predictor.pack, method=AMiF.rank))({"params": r.params}, *inputs)
  assert r.model.head == "generative" and len(fused["fusion_text_weights"]) == 2
  idx, logp = np.asarray(ranked["topk"][0]), np.asarray(ranked["scores"][0], np.float64)
  top = [(r.answers[idx[i]], float(np.exp(logp[i])))
         for i in np.argsort(-logp, kind="stable")[:3]]
  assert [a["answer"] for a in result["answers"]] == [a for a, _ in top]
  assert scores == pytest.approx([s for _, s in top], rel=2e-5)
  mask = np.asarray(example["attention_mask"], bool)
  tokens = r.tokenizer.hf.convert_ids_to_tokens(example["input_ids"][mask].tolist())
  gates = np.asarray(fused["gate"][0, :len(mask)])

  def draw(layer=-1, gate=gates.mean(axis=-1)):
    heat = visualize.patch_heatmap(np.asarray(fused["fusion_text_weights"][layer][0]), mask)
    drawn = visualize.render(picture, heat, tokens, gate[mask], question, top)
    return np.asarray(drawn, np.int32)

  # Rounding (another process) may move a few pixels a little; any other picture differs by
  # far more: the first layer's attention, the gates' maximum.
  differ = lambda want: float(np.mean(np.abs(want - got) > 16))  # The pixels' share.
  want = draw()
  assert want.shape == got.shape and differ(want) < 1e-3, differ(want)
  for wrong in (draw(layer=0), draw(gate=gates.max(axis=-1))):
    assert differ(wrong) > 1e-2, differ(wrong)
  # An empty question is refused.
  base = [sys.executable, str(ROOT / "launch" / "predict.py"), f"--checkpoint_dir={workdir}",
          f"--image={ASSETS / 'vqa_rad_sample' / 'images' / 'synpic54610.jpg'}", "--out="]
  empty = _run(base + ["--question=  ?"], devices=1, check=False)
  # In one line, as the commands report the errors of their input (not a traceback).
  assert empty.returncode == 1 and empty.stderr.startswith("error: --question '  ?' is empty")
  # A picture that could not be written is refused before the model is restored; --top >= 1.
  base[-1] = f"--out={tmp_path / 'no-such-folder' / 'a.png'}"
  bad = _run(base + ["--question=is there a fracture?"], devices=1, check=False)
  assert bad.returncode != 0 and f"no folder {tmp_path / 'no-such-folder'}" in bad.stderr
  assert not bad.stdout  # No answer printed: nothing was restored.
  base[-1] = f"--out={tmp_path / 'answer'}"
  bad = _run(base + ["--question=is there a fracture?"], devices=1, check=False)
  assert bad.returncode != 0 and "name an image file PIL writes (.png)" in bad.stderr
  # A format PIL reads but does not write was accepted, then failed after answering, and
  # emptied the file of that name.
  (tmp_path / "keep.h5").write_bytes(b"mine")
  base[-1] = f"--out={tmp_path / 'keep.h5'}"
  bad = _run(base + ["--question=is there a fracture?"], devices=1, check=False)
  assert bad.returncode != 0 and "name an image file PIL writes (.png)" in bad.stderr
  assert not bad.stdout and (tmp_path / "keep.h5").read_bytes() == b"mine"
  bad = _run(base + ["--question=is there a fracture?", "--top=0"], devices=1, check=False)
  assert bad.returncode != 0 and "flag --top=0: 0 is not a positive integer" in bad.stderr


def test_predict_and_embed_compile_with_the_runs_options(straight):
  """predict.py's and embed.py's programs for a run are compiled with the run's compiler
  options (determinism.compiler_options: train.deterministic's kernels on a GPU), as its
  evaluation's are, so they answer and embed as it does. Options XLA refuses stand in for
  them here: a command that compiles with them fails."""
  from medvqa_jax import ASSETS
  workdir, _ = straight
  prelude = textwrap.dedent(f"""
      import runpy, sys
      from medvqa_jax.train import determinism
      asked = determinism.compiler_options
      def refused(config, mesh):
        assert config.train.workdir == {str(workdir)!r}  # The run's config.
        assert asked(config, mesh) is None  # Not deterministic, and a CPU: none.
        return {{"xla_gpu_no_such_option_here": True}}
      determinism.compiler_options = refused
      sys.path.insert(0, "launch")
      sys.argv = sys.argv[1:]
      runpy.run_path(sys.argv[0], run_name="__main__")
      """)
  image = ASSETS / "vqa_rad_sample" / "images" / "synpic54610.jpg"
  for script, *flags in (("launch/predict.py", "--out="), ("launch/embed.py",)):
    out = _run([sys.executable, "-c", prelude, script, f"--checkpoint_dir={workdir}",
                f"--image={image}", "--question=is there a fracture?", *flags],
               devices=1, check=False)
    assert out.returncode == 1 and "No such compile option" in out.stderr, (script, out.stderr)
    assert not out.stdout  # Nothing answered or embedded.
