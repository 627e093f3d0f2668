"""What a run shows and records: a progress bar (step, loss, samples/s, ETA) on a terminal,
plain log lines otherwise; every step's metrics as a JSON line in `metrics.jsonl` and as
TensorBoard scalars under `tensorboard/`. Only the first host writes."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _json_line(record: dict) -> str:
  """A JSON line with non-finite numbers as null: strict JSON readers (jq, JavaScript,
  Go) refuse the NaN and Infinity that Python writes."""
  return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                     for k, v in record.items()}) + "\n"


def progress(label: str, enabled: bool = True, stream=None, every_s: float = 10.0):
  """A callback `(done, total)` for long loops (answering a split): prints `label: done/total`
  at most every `every_s` seconds, and at the end."""
  stream = stream or sys.stderr
  t0 = last = time.perf_counter()

  def report(done: int, total: int):
    nonlocal last
    now = time.perf_counter()
    if enabled and (done >= total or now - last >= every_s):
      last = now
      print(f"{label}: {done}/{total} ({_fmt_time(now - t0)})", file=stream, flush=True)
  return report


def _drop_records_after(path: Path, step: int) -> int:
  """Drops from the records file the records of steps after `step`, and a last line cut
  short by a kill; the number dropped. A run resumed from the checkpoint of `step` takes the
  later steps again, and would otherwise record them twice. Replaced atomically: a kill
  during the rewrite leaves the old file."""
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    if not line.endswith("\n"):
      continue  # The last line, cut short.
    try:
      later = json.loads(line)["step"] > step
    except (ValueError, KeyError, TypeError):
      later = False  # Not a record of ours: kept as it is.
    if not later:
      kept.append(line)
  if len(kept) == len(lines):
    return 0
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(kept))
  tmp.replace(path)
  return len(lines) - len(kept)


class Reporter:

  def __init__(self, workdir, *, total_steps: int, start_step: int, batch_size: int,
               log_every: int = 10, enabled: bool = True, tensorboard: bool = True,
               stream=None):
    self.total, self.batch = total_steps, batch_size
    self.log_every = max(log_every, 1)
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self._t0, self._s0, self._excluded = None, start_step, 0.0
    self._bar = self._jsonl = self._tb = None
    if not enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dropped = _drop_records_after(workdir / "metrics.jsonl", start_step)
    self._jsonl = open(workdir / "metrics.jsonl", "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard discards the events of the steps a resumed run takes again
      # (all of them for a run started again from step 0, killed before its first save).
      self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
    if getattr(self.stream, "isatty", lambda: False)():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream,
                       dynamic_ncols=True)
    if dropped:
      self.message(f"metrics.jsonl: dropped {dropped} record(s) of the steps after {start_step} "
                   "(written after that checkpoint; the resumed run takes those steps again)")

  def exclude(self, seconds: float):
    """Time spent between steps on other work (validation, checkpoints): not training, so
    not counted in samples/s (nor in the ETA of the training steps)."""
    if self._t0 is not None:
      self._excluded += seconds

  def _rate(self, step: int) -> float:
    """Training samples per second since the first reported step (compilation, validation
    and checkpoint time excluded), from the second step after it: the step right after it
    may have run before its metrics were read (a step computed as it is dispatched, and
    read at once for a validation), which made the first rate 25-400x too high on CPU."""
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._s0 = now, step
    if step - self._s0 < 2:
      return float("nan")
    return (step - self._s0) * self.batch / max(now - self._t0 - self._excluded, 1e-9)

  def step(self, step: int, metrics: dict):
    """Metrics (floats) after optimizer step `step` (1-based)."""
    if not self.enabled:
      return
    rate = self._rate(step)
    record = {"step": step, **metrics}
    if math.isfinite(rate):
      record["samples_per_s"] = rate
    self._jsonl.write(_json_line(record))
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(f"train/{k}", v, step)
    eta = (self.total - step) * self.batch / rate if rate > 0 else float("nan")
    loss = metrics.get("loss", float("nan"))
    # The first step reported has no rate yet (it starts the clock): "?" until the second.
    shown = f"{rate:.1f}" if math.isfinite(rate) else "?"
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(f"loss {loss:.4f} {shown} samples/s", refresh=False)
      self._bar.refresh()
    elif step % self.log_every == 0 or step == self.total:
      print(f"step {step}/{self.total}  loss {loss:.4f}  {shown} samples/s  "
            f"eta {_fmt_time(eta)}", file=self.stream, flush=True)

  def eval(self, step: int, metrics: dict, prefix: str = "val"):
    if not self.enabled:
      return
    flat = {f"{prefix}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    self._jsonl.write(_json_line({"step": step, **flat}))
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(f"{prefix}/{k.removeprefix(prefix + '_')}", v, step)
      self._tb.flush()
    self.message(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in flat.items()
                                             if isinstance(v, float)))

  def message(self, text: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def flush(self):
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
