"""Progress lines of long loops (answering a split) and of training."""

import io
import json
import struct
from pathlib import Path

import pytest

from medvqa_jax.train import observe


def test_progress_is_throttled_and_always_reports_the_end(monkeypatch):
  clock = [100.0]

  def tick():  # 0.1 s a call, 0.9 s in all: the end's "0m00s" (a real clock may pass 1 s).
    clock[0] += 0.1
    return clock[0]
  monkeypatch.setattr(observe.time, "perf_counter", tick)
  out = io.StringIO()
  report = observe.progress("test", stream=out, every_s=3600)
  for done in range(64, 451, 64):
    report(done, 451)
  report(451, 451)
  assert out.getvalue().splitlines() == ["test: 451/451 (0m00s)"]
  every = io.StringIO()
  report = observe.progress("val", stream=every, every_s=0)
  report(64, 100)
  report(100, 100)
  assert [line.split(" (")[0] for line in every.getvalue().splitlines()] == ["val: 64/100",
                                                                            "val: 100/100"]
  quiet = io.StringIO()
  observe.progress("val", enabled=False, stream=quiet)(100, 100)
  assert quiet.getvalue() == ""


def test_progress_waits_its_interval_after_each_line(tmp_path, monkeypatch):
  """The interval counts from the last line printed, not from the start: once the first
  interval had passed, every call printed a line (a line per batch of a long split)."""
  clock = [100.0]
  monkeypatch.setattr(observe.time, "perf_counter", lambda: clock[0])
  out = io.StringIO()
  report = observe.progress("val", stream=out, every_s=10)
  for done, t in ((1, 105), (2, 112), (3, 118), (4, 121), (5, 123), (6, 130)):
    clock[0] = t
    report(done, 6)
  # Lines at 12 s (10 after the start), 23 s (11 after it; not 18 s, 6 after), and the end.
  assert out.getvalue().splitlines() == ["val: 2/6 (0m12s)", "val: 5/6 (0m23s)",
                                         "val: 6/6 (0m30s)"]


def test_training_rate_leaves_out_validation_and_checkpoint_time(tmp_path, monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(observe.time, "perf_counter", lambda: clock[0])
  out = io.StringIO()
  reporter = observe.Reporter(tmp_path, total_steps=4, start_step=0, batch_size=8,
                              log_every=1, tensorboard=False, stream=out)
  reporter.step(1, {"loss": 1.0})  # The first step starts the clock (compilation).
  clock[0] += 1e-4                 # Step 2 had run before step 1's metrics were read, and
  reporter.step(2, {"loss": 1.0})  # is read at once for a validation: no rate (was 80,000).
  clock[0] += 30.0                 # Validation and a checkpoint...
  reporter.exclude(30.0)           # ...which the loop reports.
  clock[0] += 4.0                  # Steps 3 and 4 computed, step 3 read.
  reporter.step(3, {"loss": 1.0})
  clock[0] += 2.0
  reporter.step(4, {"loss": 1.0})
  reporter.close()
  rates = [r["samples_per_s"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
           if "samples_per_s" in r]
  # 16 samples in 4 s, 24 in 6 (was 16 / 34 s after validation).
  assert rates == pytest.approx([4.0, 4.0], rel=1e-4)
  assert out.getvalue().splitlines()[1] == "step 2/4  loss 1.0000  ? samples/s  eta ?"
  assert out.getvalue().splitlines()[-1] == "step 4/4  loss 1.0000  4.0 samples/s  eta 0m00s"
  # The ETA: the steps left, times the batch, over the samples per second.
  long = io.StringIO()
  clock[0] = 200.0
  reporter = observe.Reporter(tmp_path / "long", total_steps=10_000, start_step=0,
                              batch_size=8, log_every=1, tensorboard=False, stream=long)
  reporter.step(1, {"loss": 1.0})
  clock[0] += 2.0
  reporter.step(2, {"loss": 1.0})
  clock[0] += 2.0
  reporter.step(3, {"loss": 1.0})  # 16 samples in 4 s: 4 samples/s.
  clock[0] += 2.0
  reporter.step(4, {"loss": 1.0})
  reporter.close()
  # 9,997 steps of 8 samples at 4/s: 19,994 s = 5 h 33 min 14 s; 9,996: 19,992 s.
  assert long.getvalue().splitlines()[2:] == [
      "step 3/10000  loss 1.0000  4.0 samples/s  eta 5h33m",
      "step 4/10000  loss 1.0000  4.0 samples/s  eta 5h33m"]
  short = io.StringIO()
  clock[0] = 300.0
  reporter = observe.Reporter(tmp_path / "short", total_steps=20, start_step=0,
                              batch_size=8, log_every=1, tensorboard=False, stream=short)
  for s in (1, 2, 3):
    reporter.step(s, {"loss": 1.0})
    clock[0] += 2.0
  reporter.close()
  # 17 steps of 8 samples at 4/s: 34 s.
  assert short.getvalue().splitlines()[-1] == "step 3/20  loss 1.0000  4.0 samples/s  eta 0m34s"
  first = io.StringIO()
  observe.Reporter(tmp_path / "one", total_steps=1, start_step=0, batch_size=8,
                   tensorboard=False, stream=first).step(1, {"loss": 2.0})
  assert first.getvalue() == "step 1/1  loss 2.0000  ? samples/s  eta ?\n"  # Was "nan".


def test_a_resumed_run_records_the_steps_it_takes_again_once(tmp_path):
  """A run killed after its checkpoint of step 2 had recorded steps 3 and 4 (and half a line
  of step 5); resumed from step 2, it takes them again: the records of steps after 2 are
  dropped first, so each step is recorded once, and TensorBoard purges them likewise."""
  from tensorboardX.proto.event_pb2 import SessionLog
  path = tmp_path / "metrics.jsonl"
  old = [{"step": s, "loss": 10.0 + s} for s in (1, 2, 3, 4)] + [{"step": 2, "val_acc": 0.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 5, "lo')
  before = path.read_text()
  out = io.StringIO()
  reporter = observe.Reporter(tmp_path, total_steps=6, start_step=2, batch_size=8,
                              tensorboard=True, stream=out)
  assert "dropped 3 record(s) of the steps after 2" in out.getvalue()
  for s in (3, 4, 5, 6):
    reporter.step(s, {"loss": float(s)})
  reporter.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r.get("loss", r.get("val_acc"))) for r in records] == [
      (1, 11.0), (2, 12.0), (2, 0.5), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0)]
  # A fresh run (step 0) and a resume with nothing after its step leave the file alone.
  path.write_text(before.rsplit("\n", 1)[0] + "\n")
  kept = path.read_text()
  observe.Reporter(tmp_path, total_steps=6, start_step=4, batch_size=8,
                   tensorboard=False, stream=io.StringIO()).close()
  assert path.read_text() == kept
  assert not list(tmp_path.glob("*.tmp"))
  # The records are rewritten beside the file and moved over it: a run killed while it
  # rewrites them leaves them whole.
  def killed(self, target):
    raise KeyboardInterrupt
  with pytest.MonkeyPatch.context() as m:
    m.setattr(Path, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
      observe.Reporter(tmp_path, total_steps=6, start_step=1, batch_size=8, tensorboard=False,
                       stream=io.StringIO())
  assert path.read_text() == kept
  # The TensorBoard events of the resumed run start with a restart at step 3: TensorBoard
  # discards the earlier events of steps >= 3.
  (events,) = (tmp_path / "tensorboard").glob("events.*")
  starts = [e.step for e in _events(events)
            if e.HasField("session_log") and e.session_log.status == SessionLog.START]
  assert starts == [3]
  # A run started again from step 0 (killed before its first save) purges every step.
  for e in (tmp_path / "tensorboard").glob("events.*"):
    e.unlink()
  observe.Reporter(tmp_path, total_steps=6, start_step=0, batch_size=8, tensorboard=True,
                   stream=io.StringIO()).close()
  (events,) = (tmp_path / "tensorboard").glob("events.*")
  starts = [e.step for e in _events(events)
            if e.HasField("session_log") and e.session_log.status == SessionLog.START]
  assert starts == [1]


def test_tensorboard_scalars_are_at_their_steps_under_their_names(tmp_path):
  """Each step's metrics are TensorBoard scalars `train/<name>` at that step (the step the
  records file gives them); an evaluation's are `<prefix>/<name>`, e.g. `val/accuracy`, at
  the step evaluated, beside the training curves of the same name."""
  reporter = observe.Reporter(tmp_path, total_steps=4, start_step=0, batch_size=8,
                              tensorboard=True, stream=io.StringIO())
  reporter.step(1, {"loss": 3.0})
  reporter.step(2, {"loss": 2.0, "accuracy": 0.25})
  reporter.eval(2, {"accuracy": 0.5, "questions": 3})
  reporter.eval(2, {"accuracy": 0.75}, prefix="test")
  reporter.close()
  (events,) = (tmp_path / "tensorboard").glob("events.*")
  scalars = [(v.tag, e.step, v.simple_value) for e in _events(events) if e.HasField("summary")
             for v in e.summary.value]
  assert scalars == [("train/loss", 1, 3.0), ("train/loss", 2, 2.0), ("train/accuracy", 2, 0.25),
                     ("val/accuracy", 2, 0.5), ("val/questions", 2, 3.0),
                     ("test/accuracy", 2, 0.75)]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 2, 2]


def _events(path):
  """The Event protos of a TensorBoard events file (records: length, its CRC, the data, its
  CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  data, at, out = path.read_bytes(), 0, []
  while at < len(data):
    (n,) = struct.unpack("<Q", data[at:at + 8])
    out.append(Event.FromString(data[at + 12:at + 12 + n]))
    at += 12 + n + 4
  return out


def test_non_finite_metrics_are_recorded_as_null(tmp_path):
  # Python writes NaN and Infinity, which strict JSON readers (jq, JavaScript) refuse.
  reporter = observe.Reporter(tmp_path, total_steps=2, start_step=0, batch_size=8,
                              tensorboard=False, stream=io.StringIO())
  reporter.step(1, {"loss": 2.0, "ot_distance": float("nan")})
  reporter.eval(1, {"accuracy": float("inf"), "questions": 3})
  reporter.close()

  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  records = [json.loads(line, parse_constant=refuse)
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == [{"step": 1, "loss": 2.0, "ot_distance": None},
                     {"step": 1, "val_accuracy": None, "val_questions": 3}]
