"""medvqa_jax/train/trace.py and benchmarks/trace_summary.py: a trace of real steps captured on
the CPU (which records host events only), and the device summary checked on a trace written
here in the form the profiler gives a GPU's (a device process with an `XLA Ops` line beside
its streams), totals worked out by hand."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from medvqa_jax.train import trace

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "jit(train_step)/jit(main)/transpose(jvp(AMiF))"


def _write(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
  return str(path)


def _meta(pid, name, tid=None):
  e = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name",
       "args": {"name": name}}
  if tid is not None:
    e["tid"] = tid
  return e


def _op(pid, tid, name, dur_us, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur_us, "name": name,
          "args": args}


def _gpu_trace(path, with_ops_line=True):
  ops = 10 if with_ops_line else 11
  events = [
      _meta(1, "/host:CPU"), _meta(1, "python", tid=5),
      _meta(2, "/device:GPU:0"), _meta(2, "Stream #13(Compute)", tid=11),
      _op(1, 5, "PjitFunction(train_step)", 50_000),  # Host time: never counted.
      _op(2, ops, "gemm_fusion_dot.1", 3000, tf_op=f"{PREFIX}/image/block_0/mlp/dot_general"),
      _op(2, ops, "custom-call.7", 2000,
          long_name='%custom-call.7 = (bf16[8,16,4,64]) custom-call(...), '
                    'custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name='
                    f'"{PREFIX}/fusion/layer_1/attention/dot_product_attention"}}'),
      _op(2, ops, "loop_add_fusion.3", 1000, tf_op=f"{PREFIX}/decoder/ln/add"),
      _op(2, ops, "all-reduce.1", 500),
  ]
  if with_ops_line:
    # The XLA Ops line is read, so the stream's kernels (the same work) are not counted again.
    events += [_meta(2, "XLA Ops", tid=10), _op(2, 11, "sm90_xmma_gemm_bf16", 99_999)]
  return _write(path, events)


def test_device_time_is_split_by_kind_scope_and_op(tmp_path):
  s = trace.summarize(_gpu_trace(tmp_path / "t.json.gz"), steps=2)
  # Per step (2 steps): matmul 1.5 ms, fused attention 1.0, fusion 0.5, all-reduce 0.25.
  assert s["busy_ms"] == pytest.approx(3.25) and s["lines"] == ["XLA Ops"]
  assert s["by_kind"] == [("matmul", 1.5, round(1.5 / 3.25, 4)),
                          ("attention (fused)", 1.0, round(1 / 3.25, 4)),
                          ("fusion", 0.5, round(0.5 / 3.25, 4)),
                          ("collective", 0.25, round(0.25 / 3.25, 4))]
  assert [row[:2] for row in s["by_scope"]] == [("image", 1.5), ("fusion", 1.0),
                                                ("decoder", 0.5), ("(unnamed)", 0.25)]
  assert [row[0] for row in s["by_op"]] == ["gemm_fusion_dot.1", "custom-call.7",
                                            "loop_add_fusion.3", "all-reduce.1"]
  deeper = trace.summarize(str(tmp_path / "t.json.gz"), steps=2, depth=2, top=1)
  assert deeper["by_scope"][0][:2] == ("image/block_0", 1.5) and len(deeper["by_op"]) == 1
  text = trace.format_summary(s)
  assert "device busy 3.25 ms per step" in text and "46.2%  matmul" in text


def test_without_an_ops_line_every_device_line_is_read(tmp_path):
  s = trace.summarize(_gpu_trace(tmp_path / "t.json.gz", with_ops_line=False), steps=1)
  assert s["busy_ms"] == pytest.approx(6.5) and s["lines"] == ["Stream #13(Compute)"]


def test_scope_names_the_model_part_not_the_transformation():
  assert trace.scope_of(f"{PREFIX}/image/proj/transpose") == "image"
  assert trace.scope_of(f"{PREFIX}/image/proj/transpose", depth=2) == "image/proj"
  assert trace.scope_of("jit(step)/while/body/sinkhorn/exp", depth=2) == "sinkhorn"
  assert trace.scope_of("add") == "(unnamed)" and trace.scope_of("") == "(unnamed)"


def test_a_cpu_trace_is_captured_and_said_to_hold_no_device_events(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((64, 64))
  path = trace.capture(lambda: f(a), 2, str(tmp_path / "prof"))
  assert path == str(tmp_path / "prof" / "trace.json.gz")
  assert list((tmp_path / "prof" / "plugins" / "profile").iterdir())  # The profiler's own.
  with gzip.open(path, "rt") as fh:
    assert json.load(fh)["traceEvents"]
  with pytest.raises(ValueError, match="no device events .*/host:CPU"):
    trace.summarize(path)


def test_unreadable_trace_and_bad_steps_are_refused(tmp_path):
  bad = tmp_path / "bad.json.gz"
  bad.write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="bad.json.gz: not a readable trace"):
    trace.summarize(str(bad))
  with pytest.raises(ValueError, match="steps must be at least 1"):
    trace.summarize(_gpu_trace(tmp_path / "t.json.gz"), steps=0)


def test_the_command_prints_tables_or_json_and_says_what_is_wrong(tmp_path):
  path = _gpu_trace(tmp_path / "t.json.gz")
  run = lambda *a: subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"),
                                   *a], capture_output=True, text=True, timeout=120)
  out = run(path, "--steps=2")
  assert out.returncode == 0, out.stderr
  assert "by kind of work:" in out.stdout and "1.500 ms  46.2%  matmul" in out.stdout
  out = run(path, "--steps=2", "--json")
  assert json.loads(out.stdout)["busy_ms"] == pytest.approx(3.25)
  out = run(str(tmp_path / "missing.json.gz"))
  assert out.returncode == 1 and "error: " in out.stderr
  assert "missing.json.gz: no such file" in out.stderr
  helped = run("--help")
  assert helped.returncode == 0 and helped.stdout.startswith("usage: trace_summary.py")
  assert "--depth" in helped.stdout and "launch/benchmark.py" in helped.stdout
  cpu = _write(tmp_path / "cpu.json.gz", [_meta(1, "/host:CPU"), _op(1, 5, "x", 10)])
  out = run(cpu)
  assert out.returncode == 1 and "no device events" in out.stderr
