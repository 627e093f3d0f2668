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

A GPU's kernel events mostly do not carry their JAX op's name (on an H200, jax 0.11: 94-98%
of the device time of a step came out unnamed). `hlo_ops` reads the compiled program's HLO
text (`compiled.as_text()`) into a table of its launched instructions (name, opcode, custom
call target, JAX op name), which `summarize` takes as `hlo`: an event is matched to its
instruction by its name (XLA names a fusion's kernel after the instruction, `.` and `-` as
`_`) or by any of its arguments' values. `launch/benchmark.py --profile_dir` keeps that
table beside the trace (`hlo_ops.json.gz`).
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
    # cuDNN's flash kernels ("sdpa", and the dO.O product of their backward pass).
    ("attention (fused)", ("fmha", "flash", "dot_product_attention", "sdpa",
                           "compute_dot_do_o")),
    # Random bits (dropout's masks): the threefry hash, or XLA's RngBitGenerator.
    ("random bits", ("threefry", "philox", "rng-bit-generator", "rng_bit_generator",
                     "rngbitgenerator")),
    # cuBLAS (on Hopper its kernels are named nvjet_*), CUTLASS, Triton's gemm fusions.
    ("matmul", ("gemm", "cublas", "nvjet", "cutlass", "xmma", "dot(", "dot.", "dot_general",
                "matmul", "convolution", "$conv")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice")),
    ("fusion", ("fusion", "loop_", "input_", "reduce")),
)
# Name-stack components that say how, not where: JAX's transformations and jit wrappers.
_HOW = re.compile(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint|cond|while|body|scan|"
                  r"custom_jvp_call|custom_vjp_call|closed_call|core_call|xla_call|shard_map|"
                  r"named_call|rematted_computation)(\(.*\))?$")
# A Flax method's scope ("AMiF.context", "Dropout.__call__") or a Python function's
# ("make_train_step.<locals>.step"), and a name a transformation wraps ("jvp(AMiF.vqa)",
# "transpose(jvp(image))"): kept only where no other scope names the place.
_METHOD = re.compile(r"^[\w<>]+(\.[\w<>]+)+$")
_WRAP = re.compile(r"^(jvp|transpose|vmap|remat|checkpoint|rematted_computation|pmap|"
                   r"shard_map)\((.*)\)$")


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
  """The first `depth` components of a JAX op name that name a part of the model, past the
  transformations and the Flax methods: 'jit(step)/transpose(jvp(AMiF.vqa))/AMiF.context/
  AMiF.encode_image/image/layer_3/attention/dot_general' -> 'image'. An op outside every
  module (the optimiser's update, the loss's glue): '(unnamed)'."""
  strong, weak = [], []
  for part in jax_name.split(";")[0].split("/")[:-1]:  # The last: the primitive.
    wrapped = False
    while (m := _WRAP.match(part)):
      part, wrapped = m.group(2), True
    if not part or _HOW.match(part):
      continue
    (weak if wrapped or _METHOD.match(part) else strong).append(part)
  where = strong or weak[-1:]
  return "/".join(where[:depth]) if where else "(unnamed)"


def _jax_name(args: dict) -> str:
  for key in ("tf_op", "name", "jax_op", "op_name"):
    value = args.get(key)
    if isinstance(value, str) and "/" in value:
      return value.split(":")[0]
  match = re.search(r'op_name="([^"]+)"', str(args.get("long_name", "")))
  return match.group(1) if match else ""


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"^(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
# Computations that run inside another instruction's kernel: a fusion's body, and what an
# instruction applies to each element or pair (a reduction's `to_apply`, a sort's
# comparator, select-and-scatter's `select` and `scatter`).
_FUSION_CALLS = re.compile(r"\bfusion\(.*?calls=%?([\w.\-]+)")
_APPLIED = re.compile(r"\b(?:to_apply|comparator|select|scatter)=%?([\w.\-]+)")
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _key(name: str) -> str:
  return name.replace(".", "_").replace("-", "_")


def _instructions(hlo_text: str):
  """(name, text after "=", opcode match or None, whether inside another instruction's
  kernel: a fusion's body or a computation applied per element, the computation's name) of
  each instruction of a compiled HLO module, tuple shapes' "/*index=5*/" markers removed."""
  fused = set(_FUSION_CALLS.findall(hlo_text)) | set(_APPLIED.findall(hlo_text))
  in_fusion, computation = False, ""
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("(")[0]:
      computation = head.group(1)
      in_fusion = computation in fused
      continue
    inst = _INSTRUCTION.match(line)
    if inst:
      rest = re.sub(r"/\*.*?\*/", "", inst.group(2))
      yield inst.group(1), rest, _OPCODE.match(rest), in_fusion, computation


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LOOP_PARTS = re.compile(r"\b(condition|body)=%?([\w.\-]+)")
# The computations an instruction runs as kernels of their own: a call's or an asynchronous
# op's, a conditional's branches.
_CALLED = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|\bbranch_computations=\{([^}]*)\}")


def runs_per_step(hlo_text: str) -> dict:
  """{computation: how many times it runs per execution of the module}, for the computations
  whose instructions run as kernels (not fusions' bodies, nor what runs inside an
  instruction's kernel): a loop's body as many times as its known trip count (`lax.scan`'s,
  XLA's `known_trip_count`; once if not known), its condition once more, and what those
  call as often; a computation no instruction is seen to call, the entry's among them, once."""
  callers, is_fusion, computations = {}, set(_FUSION_CALLS.findall(hlo_text)), set()
  for name, rest, opcode, in_fusion, computation in _instructions(hlo_text):
    if in_fusion or not opcode:
      continue
    computations.add(computation)
    if opcode.group(1) == "while":
      trips = _TRIP_COUNT.search(rest)
      n = int(trips.group(1)) if trips else 1
      for part, callee in _LOOP_PARTS.findall(rest):
        callers.setdefault(callee, []).append((computation, n + (part == "condition")))
      continue
    if opcode.group(1) == "fusion":
      continue
    for single, branches in _CALLED.findall(rest):
      for callee in [single] if single else re.findall(r"%?([\w.\-]+)", branches):
        if callee not in is_fusion:
          callers.setdefault(callee, []).append((computation, 1))
  runs = {}

  def count(c):  # HLO's calls make no cycles.
    if c not in runs:
      runs[c] = sum(count(caller) * n for caller, n in callers[c]) if c in callers else 1
    return runs[c]
  return {c: count(c) for c in computations}


def _row(rest: str, opcode) -> list:
  """[opcode, custom call target, JAX op name] of an instruction."""
  target = re.search(r'custom_call_target="([^"]+)"', rest)
  op_name = re.search(r'op_name="([^"]+)"', rest)
  return [opcode.group(1) if opcode else "", target.group(1) if target else "",
          op_name.group(1) if op_name else ""]


def hlo_ops(hlo_text: str) -> dict:
  """{instruction name: [opcode, custom call target, JAX op name]} for the instructions of a
  compiled HLO module (`compiled.as_text()`) that run as kernels or library calls: those of
  every computation but the bodies of fusions (a fusion runs as one kernel, named after the
  fusion instruction) and what an instruction applies per element (a reduction's adder). Each
  name is also keyed with `.` and `-` as `_`, as XLA names the
  kernels."""
  table = {}
  for name, rest, opcode, in_fusion, _ in _instructions(hlo_text):
    if in_fusion or (opcode and opcode.group(1) in _NO_KERNEL):
      continue
    row = _row(rest, opcode)
    table[name] = row
    table.setdefault(_key(name), row)
  return table


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+|f8\w*|c64|c128)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def array_bytes(shape_text: str) -> int:
  """Bytes of the arrays an HLO shape names ("f32[16,10,64]{2,1,0}", a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = _ITEM_BYTES.get(dtype) or (1 if dtype.startswith("f8") else int(dtype[1:]) // 8)
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size
  return total


def collective_ops(hlo_text: str, runs: dict | None = None) -> list:
  """[(opcode, result shape, JAX op name)] of a compiled HLO module's collectives, each once:
  a synchronous op, or the `-done` half of an asynchronous one (whose result is the op's
  output, where the `-start` half's also holds its inputs); a collective wrapped in an
  `async-start` appears in its own computation, synchronous. The result is what each device
  ends with: an all-gather's gathered array, an all-reduce's reduced one, a reduce-scatter's
  shard. An op inside a loop (a scanned stack, gradient accumulation) is listed once, or,
  given `runs` (`runs_per_step`), with a fourth item: how many times it runs."""
  ops = []
  for _, rest, opcode, _, computation in _instructions(hlo_text):
    kind = opcode.group(1).removesuffix("-done") if opcode else None
    if kind in COLLECTIVES:
      op = (kind, rest[:opcode.start(1)].strip(), _row(rest, opcode)[2])
      ops.append(op if runs is None else (*op, runs.get(computation, 1)))
  return ops


def collectives(hlo_text: str) -> dict:
  """{opcode: {"count", "bytes"}} of `collective_ops`: per device and step, as compiled (on a
  CPU, XLA may move bf16 arrays as float32), an op in a loop's body as often as it runs."""
  out = {}
  for opcode, shape, _, runs in collective_ops(hlo_text, runs_per_step(hlo_text)):
    entry = out.setdefault(opcode, {"count": 0, "bytes": 0})
    entry["count"] += runs
    entry["bytes"] += runs * array_bytes(shape)
  return dict(sorted(out.items()))


# Instructions that run no kernel of their own, or whose kernels are counted inside them.
_NOT_TRAFFIC = _NO_KERNEL | {"while", "call", "conditional", "async-start", "async-update",
                             "async-done", "after-all", "partition-id", "replica-id"}
# A library call's last result when it is its scratch space (cuBLAS's 4 MB).
_WORKSPACE = re.compile(r",\s*[su]8\[\d+\](\{[^}]*\})?\s*\)$")


def _operands(rest: str, opcode_end: int) -> list[str]:
  """The instruction names between an opcode's parentheses."""
  depth = 0
  for i in range(opcode_end, len(rest)):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[opcode_end:i])
  return []


def hlo_traffic(hlo_text: str, depth: int = 1, top: int = 12) -> dict:
  """What the kernels of a compiled HLO module read and write, summed from each kernel's
  operand and result sizes (every computation's instructions that run as kernels or library
  calls, fusions as one, a reduction's adder inside its kernel; bitcasts, tuples,
  parameters and a library call's workspace move nothing): `bytes` in all, and by kind of
  work (`kind_of`) and by model part (`scope_of`, `depth` deep; the `top` largest), per step
  and device, largest first. An operand that a fusion only slices, or gathers from, counts
  as what its slices and gathers take (`_partial_reads`). An upper bound on HBM traffic
  where a kernel reads only part of an operand otherwise (a gather outside a fusion reads
  part of its table). A kernel in a loop's body counts as often as the loop runs it
  (`runs_per_step`: a scanned stack's trip count; once where XLA does not know it). Its use
  is the memory-bound part of a step, which on an H200 is as long as the matrix products
  (BENCHMARKS.md): the fusions' gigabytes over the chip's bandwidth give the time they
  cannot beat. Also `kernels`, how many launches a step makes, and `small_kernels`, those
  that move under `SMALL_KERNEL_BYTES` each: on a GPU each costs a launch and a few
  microseconds whatever it moves, a floor that bytes do not show."""
  shapes, kernels, bodies = {}, [], {}
  for name, rest, opcode, in_fusion, computation in _instructions(hlo_text):
    if not opcode:
      continue
    shapes[name] = rest[:opcode.start(1)]
    if in_fusion:
      bodies.setdefault(computation, []).append(
          (name, opcode.group(1), rest, _operands(rest, opcode.end(1))))
    elif opcode.group(1) not in _NOT_TRAFFIC:
      calls = _FUSION_CALLS.search(rest)
      kernels.append((name, *_row(rest, opcode), shapes[name],
                      _operands(rest, opcode.end(1)), calls.group(1) if calls else None,
                      computation))
  partial = {c: _partial_reads(body, shapes) for c, body in bodies.items()}
  in_place = {c: _in_place(body, shapes) for c, body in bodies.items()}
  # A fusion around a matrix product is one (the CPU's and TPU's fusions hold their dots; a
  # GPU's are library calls or gemm fusions, named so).
  products = {c for c, body in bodies.items()
              if any(op in ("dot", "convolution") for _, op, _, _ in body)}
  by_kind, by_scope, small, launches, runs = {}, {}, 0, 0, runs_per_step(hlo_text)
  for name, opcode, target, op_name, shape, operands, calls, computation in kernels:
    if opcode == "custom-call":  # Its scratch space moves nothing.
      shape = _WORKSPACE.sub(")", shape.strip())
    reads, (untouched, unwritten) = partial.get(calls, {}), in_place.get(calls, ((), 0))
    if opcode == "dynamic-update-slice":  # In place: the update read, then written.
      untouched, unwritten = (0,), array_bytes(shape) - array_bytes(shapes.get(operands[1], ""))
    moved = array_bytes(shape) - unwritten + sum(
        0 if i in untouched else reads.get(i, array_bytes(shapes.get(o, "")))
        for i, o in enumerate(operands))
    n = runs.get(computation, 1)
    kind = "matmul" if calls in products else kind_of(" ".join((opcode, target, name)))
    by_kind[kind] = by_kind.get(kind, 0) + n * moved
    scope = scope_of(op_name, depth)
    by_scope[scope] = by_scope.get(scope, 0) + n * moved
    launches += n
    small += n * (moved < SMALL_KERNEL_BYTES)
  ranked = lambda table, n=None: dict(sorted(table.items(), key=lambda kv: -kv[1])[:n])
  return {"bytes": sum(by_kind.values()), "by_kind": ranked(by_kind),
          "by_scope": ranked(by_scope, top), "kernels": launches, "small_kernels": small}


# A kernel that moves less than this (1 MB: 0.2 us at an H200's 4.8 TB/s) takes about its
# launch's time.
SMALL_KERNEL_BYTES = 10 ** 6


# Instructions that read part of their first operand: about as much as they make.
_PARTIAL_READERS = {"slice", "dynamic-slice", "gather"}
_PARAMETER = re.compile(r"\bparameter\((\d+)\)")


def _parameters(body: list) -> dict:
  """{instruction name: parameter number} of a fused computation's parameters."""
  return {name: int(_PARAMETER.search(rest).group(1))
          for name, opcode, rest, _ in body if opcode == "parameter"}


def _partial_reads(body: list, shapes: dict) -> dict:
  """{parameter number: bytes} of a fused computation's parameters that are read only as the
  first operand of slices, dynamic slices and gathers (XLA's dot merger slices one product
  into several, each slice a kernel of its own): what those take, at most the parameter's
  size. body: [(name, opcode, text after "=", operand names)] of its instructions."""
  params = _parameters(body)
  taken, whole = {}, set()
  for name, opcode, _, operands in body:
    for position, operand in enumerate(operands):
      if operand not in params:
        continue
      if opcode in _PARTIAL_READERS and position == 0:
        taken[operand] = taken.get(operand, 0) + array_bytes(shapes.get(name, ""))
      else:
        whole.add(operand)
  return {params[p]: min(b, array_bytes(shapes.get(p, "")))
          for p, b in taken.items() if p not in whole}


def _in_place(body: list, shapes: dict) -> tuple:
  """(parameter numbers, bytes) of a fused computation's in-place updates: a result (the
  root, or an item of the root's tuple) that is a dynamic-update-slice of a parameter shares
  that parameter's buffer (a scanned loop's stacked outputs), so the kernel does not read the
  parameter and writes only the update. Its root is the body's last instruction."""
  params = _parameters(body)
  ops = {name: (opcode, operands) for name, opcode, _, operands in body}
  root_opcode, root_operands = ops[body[-1][0]]
  results = root_operands if root_opcode == "tuple" else [body[-1][0]]
  untouched, unwritten = [], 0
  for result in results:
    opcode, operands = ops.get(result, ("", []))
    if opcode == "dynamic-update-slice" and operands[0] in params:
      untouched.append(params[operands[0]])
      unwritten += array_bytes(shapes.get(result, "")) - array_bytes(shapes.get(operands[1], ""))
  return tuple(untouched), unwritten


def gigabytes(traffic: dict) -> dict:
  """`hlo_traffic`'s figures in GB, to the MB (its kernel counts as they are)."""
  return {"total": round(traffic["bytes"] / 1e9, 3),
          **{k: {name: round(b / 1e9, 3) for name, b in traffic[k].items()}
             for k in ("by_kind", "by_scope")},
          **{k: traffic[k] for k in ("kernels", "small_kernels") if k in traffic}}


def save_hlo_ops(table: dict, path: str) -> str:
  """Writes an `hlo_ops` table as gzipped JSON (atomically); returns the path."""
  with gzip.open(path + ".tmp", "wt") as f:
    json.dump(table, f)
  os.replace(path + ".tmp", path)
  return path


def load_hlo_ops(path: str) -> dict:
  try:
    with gzip.open(path, "rt") as f:
      table = json.load(f)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: not a readable HLO op table (gzipped JSON, as "
                     f"launch/benchmark.py --profile_dir writes it): {e}") from e
  if not isinstance(table, dict):
    raise ValueError(f"{path}: not an HLO op table (expected a JSON object)")
  return table


def _hlo_row(name: str, args: dict, hlo: dict):
  """The HLO row of a trace event: by its own name, else by any of its arguments' values."""
  for value in (name, *args.values()):
    if isinstance(value, str) and len(value) < 200:
      for candidate in (value, value.split(":")[0].lstrip("%"), _key(value)):
        if candidate in hlo:
          return hlo[candidate]
  return None


def summarize(path: str, steps: int = 1, depth: int = 1, top: int = 15,
              hlo: dict | None = None) -> dict:
  """Totals of the device events of a trace of `steps` steps, in ms per step and device
  (averaged over the `devices` traced: one process traces all of its GPUs): `busy_ms` (the
  events' summed durations on the lines read), and `by_kind`, `by_scope` (JAX name scopes,
  `depth` deep), `by_op` (the `top` longest), each a list of (name, ms per step, share).
  `hlo`: the program's `hlo_ops` table, which names the ops of events that do not carry
  their JAX name. `named_share`: the share of the busy time with a JAX name; `arg_keys`:
  the argument names the device events carry (what the profiler records varies)."""
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
  named, arg_keys = 0.0, set()
  traced = len({e.get("pid") for e in chosen})  # Each device is a process of the trace.
  for e in chosen:
    dur = float(e.get("dur", 0)) / 1000 / steps / traced  # us -> ms per step and device
    args = e.get("args") or {}
    arg_keys.update(args)
    name = str(e.get("name", ""))
    jax_name = _jax_name(args)
    row = _hlo_row(name, args, hlo) if hlo else None
    hlo_text = ""
    if row:
      hlo_text = f"{row[0]}( {row[1]}"
      jax_name = jax_name or row[2]
    text = f"{name} {args.get('long_name', '')} {args.get('hlo_op', '')} {hlo_text}"
    by_kind[kind_of(text)] += dur
    by_scope[scope_of(jax_name, depth)] += dur
    by_op[name] += dur
    named += dur if jax_name else 0.0
  busy = sum(by_kind.values())
  table = lambda c, n=None: [(k, round(v, 3), round(v / busy, 4)) for k, v in c.most_common(n)]
  return {"trace": path, "steps": steps, "devices": traced, "busy_ms": round(busy, 3),
          "lines": sorted({threads.get((e.get("pid"), e.get("tid")), "?") for e in chosen}),
          "named_share": round(named / busy, 4) if busy else 0.0,
          "arg_keys": sorted(arg_keys),
          "by_kind": table(by_kind), "by_scope": table(by_scope),
          "by_op": table(by_op, top)}


def format_summary(s: dict) -> str:
  out = [f"{s['trace']}: device busy {s['busy_ms']:.2f} ms per step over {s['steps']} "
         f"step(s) (per device, of {s.get('devices', 1)}), "
         f"lines read: {', '.join(s['lines'])}; "
         f"{100 * s.get('named_share', 0):.1f}% of it named by JAX op; "
         f"event arguments: {', '.join(s.get('arg_keys', [])) or 'none'}"]
  for title, key in (("kind of work", "by_kind"), ("model part (JAX name scope)", "by_scope"),
                     ("op", "by_op")):
    out.append(f"  by {title}:")
    out += [f"    {ms:10.3f} ms {100 * share:5.1f}%  {name[:90]}" for name, ms, share in s[key]]
  return "\n".join(out)
