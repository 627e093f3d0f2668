"""Where a step's device time goes: a profiler trace of a few steps, summarised.

`capture` runs a function under `jax.profiler.trace` and keeps the Perfetto form of the trace
(`trace.json.gz`, Chrome trace events) beside the profiler's own folder; `summarize` reads
such a file back and totals the device's events: by kind of work (matrix products, fused
attention, fusions, copies, collectives), by the part of the model that issued them (the
first named scopes of the op's JAX name, e.g. `image`, `fusion`, `decoder`), and by op.

Device events are those of the trace's processes named `/device:...` (a CPU trace has none:
XLA's CPU runtime records host events only). Where a device has an `XLA Ops` line, that line
is read (one event per HLO op, its arguments naming the JAX op); otherwise every line of the
device (its streams' kernels).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
from typing import Callable

import jax

# Kinds of device work, first match wins, on the op's name and HLO text (lower case).
KINDS = (
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute", "nccl")),
    ("attention (fused)", ("fmha", "flash", "dot_product_attention")),
    ("matmul", ("gemm", "cublas", "dot(", "dot.", "dot_general", "matmul", "convolution",
                "$conv")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice")),
    ("fusion", ("fusion", "loop_", "input_", "reduce")),
)
# Name-stack components that say how, not where: JAX's transformations and jit wrappers.
_HOW = re.compile(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint|cond|while|body|scan|"
                  r"custom_jvp_call|custom_vjp_call|closed_call|core_call|xla_call|shard_map|"
                  r"named_call|rematted_computation)(\(.*\))?$")


def capture(fn: Callable[[], object], steps: int, out_dir: str) -> str:
  """Calls `fn` `steps` times under the profiler, blocking on the last output, and returns
  the path of the trace's Perfetto form, copied to `out_dir/trace.json.gz` (the profiler's
  own files stay under `out_dir/plugins/profile/`)."""
  os.makedirs(out_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(out_dir, "plugins", "profile", "*")))
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
  runs = sorted(set(glob.glob(os.path.join(out_dir, "plugins", "profile", "*"))) - before)
  found = [p for r in runs for p in glob.glob(os.path.join(r, "*perfetto_trace.json.gz"))]
  if not found:
    raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {out_dir}")
  dest = os.path.join(out_dir, "trace.json.gz")
  shutil.copyfile(found[-1], dest + ".tmp")
  os.replace(dest + ".tmp", dest)
  return dest


def _events(path: str) -> list:
  try:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
      data = json.load(f)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: not a readable trace (Chrome trace events JSON, "
                     f"optionally gzipped): {e}") from e
  events = data.get("traceEvents") if isinstance(data, dict) else data
  if not isinstance(events, list):
    raise ValueError(f"{path}: no traceEvents list")
  return events


def kind_of(text: str) -> str:
  text = text.lower()
  for kind, marks in KINDS:
    if any(m in text for m in marks):
      return kind
  return "other"


def scope_of(jax_name: str, depth: int = 1) -> str:
  """The first `depth` components of a JAX op name that name a part of the model:
  'jit(step)/transpose(jvp(AMiF))/image/layer_3/attention/dot_general' -> 'image'."""
  parts = jax_name.split("/")
  parts = [p for p in parts[:-1] if p and not _HOW.match(p)]  # The last: the primitive.
  return "/".join(parts[:depth]) if parts else "(unnamed)"


def _jax_name(args: dict) -> str:
  for key in ("tf_op", "name", "jax_op", "op_name"):
    value = args.get(key)
    if isinstance(value, str) and "/" in value:
      return value.split(":")[0]
  match = re.search(r'op_name="([^"]+)"', str(args.get("long_name", "")))
  return match.group(1) if match else ""


def summarize(path: str, steps: int = 1, depth: int = 1, top: int = 15) -> dict:
  """Totals of the device events of a trace of `steps` steps, in ms per step: `busy_ms` (the
  events' summed durations on the lines read), and `by_kind`, `by_scope` (JAX name scopes,
  `depth` deep), `by_op` (the `top` longest), each a list of (name, ms per step, share)."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1 (got {steps})")
  events = _events(path)
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  devices = {pid for pid, name in processes.items() if "/device:" in name}
  ops_lines = {key for key, name in threads.items()
               if key[0] in devices and name.strip().lower() == "xla ops"}
  read_pids = {pid for pid, _ in ops_lines}

  def wanted(e):
    if e.get("ph") != "X" or e.get("pid") not in devices:
      return False
    if e.get("pid") in read_pids:
      return (e.get("pid"), e.get("tid")) in ops_lines
    return True

  chosen = [e for e in events if wanted(e)]
  if not chosen:
    names = sorted(set(processes.values())) or ["none"]
    raise ValueError(f"{path}: no device events (processes: {', '.join(names)}); a CPU "
                     f"trace has none")
  by_kind, by_scope, by_op = (collections.Counter() for _ in range(3))
  for e in chosen:
    dur = float(e.get("dur", 0)) / 1000 / steps  # us -> ms per step
    args = e.get("args") or {}
    name = str(e.get("name", ""))
    by_kind[kind_of(f"{name} {args.get('long_name', '')} {args.get('hlo_op', '')}")] += dur
    by_scope[scope_of(_jax_name(args), depth)] += dur
    by_op[name] += dur
  busy = sum(by_kind.values())
  table = lambda c, n=None: [(k, round(v, 3), round(v / busy, 4)) for k, v in c.most_common(n)]
  return {"trace": path, "steps": steps, "busy_ms": round(busy, 3),
          "lines": sorted({threads.get((e.get("pid"), e.get("tid")), "?") for e in chosen}),
          "by_kind": table(by_kind), "by_scope": table(by_scope),
          "by_op": table(by_op, top)}


def format_summary(s: dict) -> str:
  out = [f"{s['trace']}: device busy {s['busy_ms']:.2f} ms per step over {s['steps']} "
         f"step(s), lines read: {', '.join(s['lines'])}"]
  for title, key in (("kind of work", "by_kind"), ("model part (JAX name scope)", "by_scope"),
                     ("op", "by_op")):
    out.append(f"  by {title}:")
    out += [f"    {ms:10.3f} ms {100 * share:5.1f}%  {name[:90]}" for name, ms, share in s[key]]
  return "\n".join(out)
