"""Progress lines of long loops (answering a split) and of training."""

import io
import json

from medvqa_jax.train import observe


def test_progress_is_throttled_and_always_reports_the_end():
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


def test_training_rate_leaves_out_validation_and_checkpoint_time(tmp_path, monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(observe.time, "perf_counter", lambda: clock[0])
  out = io.StringIO()
  reporter = observe.Reporter(tmp_path, total_steps=4, start_step=0, batch_size=8,
                              log_every=1, tensorboard=False, stream=out)
  reporter.step(1, {"loss": 1.0})  # The first step starts the clock (compilation).
  clock[0] += 2.0
  reporter.step(2, {"loss": 1.0})  # 8 samples in 2 s.
  clock[0] += 30.0                 # Validation and a checkpoint...
  reporter.exclude(30.0)           # ...which the loop reports.
  clock[0] += 2.0
  reporter.step(3, {"loss": 1.0})
  reporter.close()
  rates = [r["samples_per_s"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
           if "samples_per_s" in r]
  assert rates == [4.0, 4.0]  # Was 16 / 34 s = 0.47 after the validation.
  assert out.getvalue().splitlines()[-1] == "step 3/4  loss 1.0000  4.0 samples/s  eta 0m02s"
