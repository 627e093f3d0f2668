"""Progress lines of long loops (answering a split)."""

import io

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
