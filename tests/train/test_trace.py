"""medvqa_jax/train/trace.py and benchmarks/trace_summary.py: a trace of real steps captured on
the CPU (which records host events only), and the device summary checked on a trace written
here in the form the profiler gives a GPU's (a device process with an `XLA Ops` line beside
its streams), totals worked out by hand."""

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import helpers
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


def test_a_trace_of_several_devices_is_per_device(tmp_path):
  """One process traces all of its GPUs: two devices each busy 3 ms of a step were summed to
  6 ms (a busy share of 2 in the benchmark's line)."""
  events = [_meta(1, "/host:CPU")]
  for pid in (2, 3):
    events += [_meta(pid, f"/device:GPU:{pid - 2}"), _meta(pid, "XLA Ops", tid=10),
               _op(pid, 10, "gemm_fusion_dot.1", 2000, tf_op=f"{PREFIX}/image/dot_general"),
               _op(pid, 10, "all-reduce.1", 1000)]
  s = trace.summarize(_write(tmp_path / "two.json.gz", events), steps=1)
  assert s["devices"] == 2 and s["busy_ms"] == pytest.approx(3.0)
  # A share of the (per-device) busy time: 2 of each device's 3 ms carry a JAX name.
  assert s["named_share"] == round(2 / 3, 4)
  assert s["by_kind"] == [("matmul", 2.0, round(2 / 3, 4)), ("collective", 1.0, round(1 / 3, 4))]
  assert "device busy 3.00 ms per step over 1 step(s) (per device, of 2)" in \
      trace.format_summary(s)


def test_collectives_are_read_from_the_compiled_program():
  """Each collective once: synchronous, or the -done half of an asynchronous one (its -start
  half's result also holds the inputs); bytes of every array of a tuple."""
  hlo = textwrap.dedent("""\
      HloModule step
      ENTRY %main (p: f32[2,10,64]) -> f32[16,10,64] {
        %p = f32[2,10,64]{2,1,0} parameter(0)
        %ag = f32[16,10,64]{2,1,0} all-gather(f32[2,10,64]{2,1,0} %p), dimensions={0}, metadata={op_name="jit(step)/gather"}
        %ars = (bf16[64]{0}, f32[4,16]{1,0}) all-reduce-start(bf16[64]{0} %a, f32[4,16]{1,0} %b), to_apply=%add
        %ard = (bf16[64]{0}, /*index=1*/f32[4,16]{1,0}) all-reduce-done((bf16[64]{0}, f32[4,16]{1,0}) %ars)
        %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(f32[2,4]{1,0} %c), dimensions={0}
        %agd = f32[16,4]{1,0} all-gather-done((f32[2,4]{1,0}, f32[16,4]{1,0}) %ags)
        %rs = s8[8,4]{1,0} reduce-scatter(s8[64,4]{1,0} %e), dimensions={0}, to_apply=%add
        ROOT %cp = pred[] collective-permute(pred[] %d), source_target_pairs={{0,1}}
      }""")
  ops = trace.collective_ops(hlo)
  assert [op for op, _, _ in ops] == ["all-gather", "all-reduce", "all-gather", "reduce-scatter",
                                      "collective-permute"]
  assert ops[0][2] == "jit(step)/gather"
  assert trace.collectives(hlo) == {
      "all-gather": {"count": 2, "bytes": 16 * 10 * 64 * 4 + 16 * 4 * 4},
      "all-reduce": {"count": 1, "bytes": 64 * 2 + 4 * 16 * 4},
      "collective-permute": {"count": 1, "bytes": 1},
      "reduce-scatter": {"count": 1, "bytes": 8 * 4}}



def test_traffic_sums_what_each_kernel_reads_and_writes():
  """A kernel moves its operands and its result; a fusion counts as one kernel (its body's
  instructions move nothing of their own), and parameters, bitcasts, tuples and loops (whose
  body is counted instead) none; nor do the computations that an instruction applies to each
  element (a reduction's `to_apply`, a sort's comparator): they run inside its kernel."""
  hlo = textwrap.dedent("""\
      HloModule step
      %region_0.1 (r0: f32[], r1: f32[]) -> f32[] {
        %r0 = f32[] parameter(0)
        %r1 = f32[] parameter(1)
        ROOT %add.9 = f32[] add(f32[] %r0, f32[] %r1), metadata={op_name="jit(step)/image/ln/reduce_sum"}
      }
      %fused_add (a: f32[4,8], b: f32[4,8]) -> f32[4,8] {
        %a = f32[4,8]{1,0} parameter(0)
        %b = f32[4,8]{1,0} parameter(1)
        %zero = f32[] constant(0)
        %sum = f32[4,8]{1,0} add(f32[4,8]{1,0} %a, f32[4,8]{1,0} %b)
        ROOT %red = f32[4,8]{1,0} reduce-window(%sum, %zero), window={size=1x1}, to_apply=%region_0.1
      }
      %body (t: (s32[], bf16[16])) -> (s32[], bf16[16]) {
        %t = (s32[], bf16[16]{0}) parameter(0)
        %v = bf16[16]{0} get-tuple-element(%t), index=1
        %n = bf16[16]{0} negate(%v), metadata={op_name="jit(step)/text/layer_0/neg"}
        ROOT %r = (s32[], bf16[16]{0}) tuple(%i, %n)
      }
      ENTRY %main (x: f32[4,8], y: f32[4,8]) -> f32[8,8] {
        %x = f32[4,8]{1,0} parameter(0)
        %y = f32[4,8]{1,0} parameter(1)
        %f = f32[4,8]{1,0} fusion(%x, %y), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(AMiF.vqa)/image/block_0/mlp/add"}
        %bc = f32[8,4]{1,0} bitcast(%f)
        %g = (f32[8,8]{1,0}, s8[1024]{0}) custom-call(%bc, %x), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/image/block_0/mlp/fc1/dot_general"}
        %w = (s32[], bf16[16]{0}) while(%init), condition=%cond, body=%body
        %gte = f32[8,8]{1,0} get-tuple-element(%g), index=0
        ROOT %c = f32[8,8]{1,0} copy(%gte)
      }""")
  fusion = 3 * 4 * 8 * 4  # Two operands and the result, float32.
  gemm = 2 * 4 * 8 * 4 + 8 * 8 * 4  # The bitcast's bytes are the fusion's; no workspace.
  neg = 2 * 16 * 2
  copy = 2 * 8 * 8 * 4
  out = trace.hlo_traffic(hlo)
  assert out["by_kind"] == {"matmul": gemm, "fusion": fusion, "copy/transpose": copy,
                            "other": neg}
  assert list(out["by_kind"]) == ["matmul", "copy/transpose", "fusion", "other"]  # Largest first.
  assert out["bytes"] == fusion + gemm + neg + copy
  assert out["by_scope"] == {"image": fusion + gemm, "(unnamed)": copy, "text": neg}
  assert trace.hlo_traffic(hlo, top=1)["by_scope"] == {"image": fusion + gemm}
  # Four kernels (the fusion, the product, the loop body's negation, the copy), each small.
  assert (out["kernels"], out["small_kernels"]) == (4, 4)
  assert trace.gigabytes({"bytes": 1_234_567_890, "by_kind": {"fusion": 5e8},
                          "by_scope": {}}) == {"total": 1.235, "by_kind": {"fusion": 0.5},
                                               "by_scope": {}}
  assert trace.gigabytes(out)["kernels"] == 4 and trace.gigabytes(out)["small_kernels"] == 4


def test_a_fusion_around_a_matrix_product_is_a_matmul():
  """The CPU's (and a TPU's) compiler fuses its dots (`ynn_fusion.N`) and convolutions: such a
  fusion was classed with the elementwise fusions."""
  hlo = textwrap.dedent("""\
      HloModule step
      %ynn_fused (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {
        %p0 = f32[4,8]{1,0} parameter(0)
        %p1 = f32[8,8]{1,0} parameter(1)
        %d = f32[4,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
        ROOT %r = f32[4,8]{1,0} negate(%d)
      }
      %plain (q0: f32[4,8]) -> f32[4,8] {
        %q0 = f32[4,8]{1,0} parameter(0)
        ROOT %q1 = f32[4,8]{1,0} negate(%q0)
      }
      %patches (c0: f32[1,8,8,3], c1: f32[2,2,3,4]) -> f32[1,4,4,4] {
        %c0 = f32[1,8,8,3]{3,2,1,0} parameter(0)
        %c1 = f32[2,2,3,4]{3,2,1,0} parameter(1)
        %cv = f32[1,4,4,4]{3,2,1,0} convolution(%c0, %c1), window={size=2x2 stride=2x2}, dim_labels=b01f_01io->b01f
        ROOT %cn = f32[1,4,4,4]{3,2,1,0} negate(%cv)
      }
      ENTRY %main (x: f32[4,8], w: f32[8,8], img: f32[1,8,8,3], k: f32[2,2,3,4]) -> f32[4,8] {
        %x = f32[4,8]{1,0} parameter(0)
        %w = f32[8,8]{1,0} parameter(1)
        %img = f32[1,8,8,3]{3,2,1,0} parameter(2)
        %k = f32[2,2,3,4]{3,2,1,0} parameter(3)
        %e = f32[1,4,4,4]{3,2,1,0} fusion(%img, %k), kind=kOutput, calls=%patches, metadata={op_name="jit(step)/image/patch_embed/conv_general_dilated"}
        %a = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%ynn_fused, metadata={op_name="jit(step)/image/fc1/dot_general"}
        ROOT %b = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%plain, metadata={op_name="jit(step)/image/neg"}
      }""")
  out = trace.hlo_traffic(hlo)
  # A fused convolution (a ViT's patch embedding) is a matrix product too.
  patches = (8 * 8 * 3 + 2 * 2 * 3 * 4 + 4 * 4 * 4) * 4
  assert out["by_kind"] == {"matmul": (4 * 8 + 8 * 8 + 4 * 8) * 4 + patches,
                            "fusion": 2 * 4 * 8 * 4}


def test_traffic_counts_what_a_fusion_slices_or_gathers_of_an_operand(monkeypatch):
  """An operand that a fusion only slices (XLA's dot merger slices one product's result into
  several) or gathers from counts as what those take, at most its size; one that the fusion
  also reads whole, or as a gather's indices, counts whole."""
  hlo = textwrap.dedent("""\
      HloModule step
      %sliced (p0: bf16[64,40], p1: bf16[64,8]) -> bf16[64,8] {
        %p0 = bf16[64,40]{1,0} parameter(0)
        %p1 = bf16[64,8]{1,0} parameter(1)
        %s0 = bf16[64,8]{1,0} slice(%p0), slice={[0:64], [0:8]}
        %s1 = bf16[64,8]{1,0} slice(%p0), slice={[0:64], [16:24]}
        %sum = bf16[64,8]{1,0} add(%s0, %s1)
        ROOT %out = bf16[64,8]{1,0} add(%sum, %p1)
      }
      %mixed (q0: bf16[64,40]) -> (bf16[64,8], bf16[64,40]) {
        %q0 = bf16[64,40]{1,0} parameter(0)
        %q1 = bf16[64,8]{1,0} slice(%q0), slice={[0:64], [0:8]}
        %q2 = bf16[64,40]{1,0} negate(%q0)
        ROOT %q3 = (bf16[64,8]{1,0}, bf16[64,40]{1,0}) tuple(%q1, %q2)
      }
      %lookup (t0: f32[1000,16], t1: s32[4,1]) -> f32[4,16] {
        %t0 = f32[1000,16]{1,0} parameter(0)
        %t1 = s32[4,1]{1,0} parameter(1)
        ROOT %t2 = f32[4,16]{1,0} gather(%t0, %t1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,16}
      }
      ENTRY %main (x: bf16[64,40], y: bf16[64,8], table: f32[1000,16], ids: s32[4,1]) -> f32[4,16] {
        %x = bf16[64,40]{1,0} parameter(0)
        %y = bf16[64,8]{1,0} parameter(1)
        %table = f32[1000,16]{1,0} parameter(2)
        %ids = s32[4,1]{1,0} parameter(3)
        %a = bf16[64,8]{1,0} fusion(%x, %y), kind=kLoop, calls=%sliced, metadata={op_name="jit(step)/fusion/key/dot_general"}
        %b = (bf16[64,8]{1,0}, bf16[64,40]{1,0}) fusion(%x), kind=kLoop, calls=%mixed, metadata={op_name="jit(step)/text/neg"}
        ROOT %c = f32[4,16]{1,0} fusion(%table, %ids), kind=kLoop, calls=%lookup, metadata={op_name="jit(step)/decoder/word_embed"}
      }""")
  sliced = 2 * 64 * 8 * 2 + 64 * 8 * 2 + 64 * 8 * 2  # Two slices of x, y whole, the result.
  mixed = 64 * 40 * 2 + (64 * 8 + 64 * 40) * 2  # x read whole (negated), both results.
  lookup = 4 * 16 * 4 + 4 * 4 + 4 * 16 * 4  # Four rows of the table, the ids, the result.
  out = trace.hlo_traffic(hlo)
  assert out["by_scope"] == {"fusion": sliced, "text": mixed, "decoder": lookup}
  assert out["bytes"] == sliced + mixed + lookup
  # A kernel is small below 1 MB moved; below a threshold just over the slicing fusion's
  # bytes, it and the lookup are, and the fusion reading x whole is not.
  assert (out["kernels"], out["small_kernels"]) == (3, 3)
  monkeypatch.setattr(trace, "SMALL_KERNEL_BYTES", sliced + 1)
  assert trace.hlo_traffic(hlo)["small_kernels"] == 2


def test_a_loop_counts_as_often_as_it_runs_and_updates_in_place():
  """A kernel in a loop's body (a scanned stack) counts once per trip of the loop's known trip
  count, nested loops multiply, its condition runs once more; a collective in the body too. A
  dynamic-update-slice into a parameter of its fusion (a scan's stacked output) shares that
  parameter's buffer: the kernel reads the update, not the stack, and writes the update."""
  hlo = textwrap.dedent("""\
      HloModule step
      %stack (s0: bf16[12,64,32], s1: bf16[64,32], s2: s32[]) -> bf16[12,64,32] {
        %s0 = bf16[12,64,32]{2,1,0} parameter(0)
        %s1 = bf16[64,32]{1,0} parameter(1)
        %s2 = s32[] parameter(2)
        %zero = s32[] constant(0)
        %n = bf16[64,32]{1,0} negate(%s1)
        %b = bf16[1,64,32]{2,1,0} bitcast(%n)
        ROOT %dus = bf16[12,64,32]{2,1,0} dynamic-update-slice(%s0, %b, %s2, %zero, %zero)
      }
      %both (t0: bf16[12,64,32], t1: bf16[64,32], t2: s32[]) -> (bf16[64,32], bf16[12,64,32]) {
        %t0 = bf16[12,64,32]{2,1,0} parameter(0)
        %t1 = bf16[64,32]{1,0} parameter(1)
        %t2 = s32[] parameter(2)
        %z = s32[] constant(0)
        %e = bf16[64,32]{1,0} exponential(%t1)
        %eb = bf16[1,64,32]{2,1,0} bitcast(%e)
        %upd = bf16[12,64,32]{2,1,0} dynamic-update-slice(%t0, %eb, %t2, %z, %z)
        ROOT %tup = (bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}) tuple(%e, %upd)
      }
      %inner (u: (s32[], f32[16])) -> (s32[], f32[16]) {
        %u = (s32[], f32[16]{0}) parameter(0)
        %v = f32[16]{0} get-tuple-element(%u), index=1
        %w = f32[16]{0} sine(%v), metadata={op_name="jit(step)/text/sin"}
        ROOT %r = (s32[], f32[16]{0}) tuple(%i, %w)
      }
      %inner_cond (c: (s32[], f32[16])) -> pred[] {
        %c = (s32[], f32[16]{0}) parameter(0)
        ROOT %lt = pred[] compare(%i, %k), direction=LT
      }
      %body (p: (s32[], bf16[64,32], bf16[12,64,32], f32[16])) -> (s32[], bf16[64,32], bf16[12,64,32], f32[16]) {
        %p = (s32[], bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}, f32[16]{0}) parameter(0)
        %i = s32[] get-tuple-element(%p), index=0
        %x = bf16[64,32]{1,0} get-tuple-element(%p), index=1
        %ys = bf16[12,64,32]{2,1,0} get-tuple-element(%p), index=2
        %h = f32[16]{0} get-tuple-element(%p), index=3
        %f = bf16[12,64,32]{2,1,0} fusion(%ys, %x, %i), kind=kLoop, calls=%stack, metadata={op_name="jit(step)/image/dynamic_update_slice"}
        %g = (bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}) fusion(%f, %x, %i), kind=kLoop, calls=%both, metadata={op_name="jit(step)/image/exp"}
        %ar = f32[16]{0} all-reduce(%h), to_apply=%add
        %l = (s32[], f32[16]{0}) while(%init), condition=%inner_cond, body=%inner, backend_config={"known_trip_count":{"n":"2"}}
        %d = bf16[12,64,32]{2,1,0} dynamic-update-slice(%ys, %one, %i, %zero, %zero), metadata={op_name="jit(step)/image/stack"}
        ROOT %out = (s32[], bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}, f32[16]{0}) tuple(%i, %x, %f, %ar)
      }
      %cond (q: (s32[], bf16[64,32], bf16[12,64,32], f32[16])) -> pred[] {
        %q = (s32[], bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}, f32[16]{0}) parameter(0)
        %qi = s32[] get-tuple-element(%q), index=0
        ROOT %less = pred[] compare(%qi, %twelve), direction=LT, metadata={op_name="jit(step)/image/lt"}
      }
      ENTRY %main (a: bf16[64,32], one: bf16[1,64,32]) -> bf16[64,32] {
        %a = bf16[64,32]{1,0} parameter(0)
        %one = bf16[1,64,32]{2,1,0} parameter(1)
        %loop = (s32[], bf16[64,32]{1,0}, bf16[12,64,32]{2,1,0}, f32[16]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
        ROOT %c = bf16[64,32]{1,0} copy(%a)
      }""")
  assert trace.runs_per_step(hlo) == {"main": 1, "body": 12, "cond": 13, "inner": 24,
                                      "inner_cond": 36}
  row = 64 * 32 * 2  # One bf16 [64, 32] slice: what each update reads and writes.
  stack = 2 * row + 4  # Reads x and the index, writes its slice; the stack is not read.
  both = 2 * row + 4 + row  # Also writes exp(x) whole beside the slice.
  plain_dus = 2 * row + 4 * 3  # Unfused: reads the update and three indices, writes it.
  sine, compare, reduce, copy = 2 * 16 * 4, 4 + 1, 2 * 16 * 4, 2 * row
  out = trace.hlo_traffic(hlo)
  assert out["by_scope"] == {"image": 12 * (stack + both + plain_dus) + 13 * compare,
                             "text": 24 * sine,
                             "(unnamed)": copy + 12 * reduce + 36 * compare}
  assert out["kernels"] == 12 * 4 + 13 + 24 + 36 + 1  # The all-reduce is a kernel too.
  # Each launch moves well under 1 MB: every trip's launches are small ones.
  assert out["small_kernels"] == out["kernels"]
  assert trace.collectives(hlo) == {"all-reduce": {"count": 12, "bytes": 12 * 16 * 4}}
  assert [runs for *_, runs in trace.collective_ops(hlo, trace.runs_per_step(hlo))] == [12]


def test_a_scanned_programs_traffic_grows_with_its_length():
  """Compiled: each further step of a scan over a (128, 128) product and tanh moves the same."""
  a = jnp.ones((128, 128))

  def moved(length):
    scan = lambda a: jax.lax.scan(lambda c, _: (jnp.tanh(c @ a), None), a, None, length=length)
    return trace.hlo_traffic(jax.jit(scan).lower(a).compile().as_text())["bytes"]
  two, four, eight = moved(2), moved(4), moved(8)
  assert eight - four == 2 * (four - two) >= 2 * 2 * a.nbytes


def test_traffic_of_a_compiled_program():
  """On a compiled step: a jitted (256, 256) float32 product and tanh moves at least its
  operands and result once, and not more than a few times over."""
  a = jnp.ones((256, 256))
  hlo = jax.jit(lambda a: jnp.tanh(a @ a)).lower(a).compile().as_text()
  moved = trace.hlo_traffic(hlo)["bytes"]
  assert 2 * a.nbytes <= moved <= 8 * a.nbytes

def test_without_an_ops_line_every_device_line_is_read(tmp_path):
  s = trace.summarize(_gpu_trace(tmp_path / "t.json.gz", with_ops_line=False), steps=1)
  assert s["busy_ms"] == pytest.approx(6.5) and s["lines"] == ["Stream #13(Compute)"]


def test_scope_names_the_model_part_not_the_transformation():
  assert trace.scope_of(f"{PREFIX}/image/proj/transpose") == "image"
  assert trace.scope_of(f"{PREFIX}/image/proj/transpose", depth=2) == "image/proj"
  assert trace.scope_of("jit(step)/while/body/sinkhorn/exp", depth=2) == "sinkhorn"
  assert trace.scope_of("add") == "(unnamed)" and trace.scope_of("") == "(unnamed)"
  # Only Flax methods (no module scope): the innermost one says where, not the outermost
  # (the model's entry point, the same for every op).
  assert trace.scope_of("jit(step)/jvp(AMiF.vqa)/AMiF.context/AMiF.encode_image/"
                        "dot_general") == "AMiF.encode_image"


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
  # --depth and --top reach the summary: as worked out by hand above, the first scope two
  # components deep and the one longest op.
  out = run(path, "--steps=2", "--json", "--depth=2", "--top=1")
  s = json.loads(out.stdout)
  assert s["busy_ms"] == pytest.approx(3.25)
  assert [row[:2] for row in s["by_scope"]][:2] == [["image/block_0", 1.5],
                                                     ["fusion/layer_1", 1.0]]
  assert [row[0] for row in s["by_op"]] == ["gemm_fusion_dot.1"]
  out = run(str(tmp_path / "missing.json.gz"))
  assert out.returncode == 1 and "error: " in out.stderr
  assert "missing.json.gz: no such file" in out.stderr
  out = run(str(tmp_path))  # The profile folder: named as such, with the file in it.
  assert out.returncode == 1 and f"{tmp_path}: is a folder; give the file in it" in out.stderr
  helped = run("--help")
  assert helped.returncode == 0 and helped.stdout.startswith("usage: trace_summary.py")
  assert "--depth" in helped.stdout and "launch/benchmark.py" in helped.stdout
  cpu = _write(tmp_path / "cpu.json.gz", [_meta(1, "/host:CPU"), _op(1, 5, "x", 10)])
  out = run(cpu)
  assert out.returncode == 1 and "no device events" in out.stderr


def test_the_command_refuses_a_depth_or_top_out_of_range(tmp_path, capsys):
  """--depth=0 put the named ops under one blank scope, --depth=-1 cut every scope short of
  its last part, --top=-2 listed no ops: each printed tables without a word. A usage error
  now (exit status 2, as argparse's), naming the flag; --top=0 (no op table) is allowed."""
  command = helpers.benchmark_script("trace_summary")
  path = _gpu_trace(tmp_path / "t.json.gz")
  for bad in ("--depth=0", "--depth=-1", "--top=-2"):
    with pytest.raises(SystemExit) as exit_:
      command.main([path, bad])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: " in err and f"error: {bad}: " in err, err
  assert command.main([path, "--steps=2", "--top=0", "--json"]) == 0
  s = json.loads(capsys.readouterr().out)
  assert s["by_op"] == [] and s["busy_ms"] == pytest.approx(3.25)


# What an H200 gave (jax 0.11): kernels on a stream, no XLA Ops line, most events without
# their JAX name. The HLO below is in the form `compiled.as_text()` prints.
_HLO = """HloModule jit_step, is_scheduled=true

%fused_computation.7 (param_0.1: bf16[8,64]) -> bf16[8,64] {
  %param_0.1 = bf16[8,64]{1,0} parameter(0)
  ROOT %multiply.3 = bf16[8,64]{1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(step)/jvp(AMiF.vqa)/AMiF.context/AMiF.fuse/fusion/text_layer_0/mlp/mul"}
}

ENTRY %main.9 (p.1: bf16[8,64], p.2: bf16[64,64]) -> (bf16[8,64], u32[2]) {
  %p.1 = bf16[8,64]{1,0} parameter(0), metadata={op_name="state"}
  %p.2 = bf16[64,64]{1,0} parameter(1)
  %loop_multiply_fusion.23 = bf16[8,64]{1,0} fusion(%p.1), kind=kLoop, calls=%fused_computation.7, metadata={op_name="jit(step)/jvp(AMiF.vqa)/AMiF.context/AMiF.fuse/fusion/text_layer_0/mlp/mul"}
  %custom-call.45 = (bf16[8,64]{1,0}, s8[4096]{0}) custom-call(%loop_multiply_fusion.23, %p.2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp(AMiF.vqa))/AMiF.decode/decoder/layer_3/mlp/dot_general"}
  %threefry2x32.2 = (u32[2]{0}, u32[2]{0}) custom-call(%p.1), custom_call_target="cu_threefry2x32", metadata={op_name="jit(step)/jvp(AMiF.vqa)/AMiF.decode/decoder/Dropout_0/jit(_bernoulli)/threefry2x32"}
  %add.5 = bf16[64,64]{1,0} add(%p.2, %p.2), metadata={op_name="jit(step)/add"}
  ROOT %tuple.1 = (bf16[8,64]{1,0}, /*index=1*/u32[2]{0}) tuple(%loop_multiply_fusion.23, %threefry2x32.2)
}
"""


def _kernel_trace(path):
  return _write(path, [
      _meta(2, "/device:GPU:0"), _meta(2, "Stream #14(Memset,Compute)", tid=14),
      _op(2, 14, "loop_multiply_fusion_23", 4000, correlation_id=1),
      _op(2, 14, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 3000, hlo_op="custom-call.45"),
      _op(2, 14, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 2000),
      _op(2, 14, "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", 500),
      _op(2, 14, "jax::cuda::(anonymous namespace)::ThreeFry2x32Kernel(unsigned int const*)",
          1000, hlo_op="threefry2x32.2"),
      _op(2, 14, "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized>",
          1500, tf_op="jit(step)/jvp(AMiF.vqa)/AMiF.context/AMiF.encode_image/image/"
                      "patch_embed/conv_general_dilated"),
      _op(2, 14, "add_5", 100),
  ])


def test_the_hlo_table_names_what_the_kernels_do_not(tmp_path):
  hlo = trace.hlo_ops(_HLO)
  # Launched instructions only, under their own and their kernel-style names.
  assert hlo["loop_multiply_fusion.23"] == hlo["loop_multiply_fusion_23"] == [
      "fusion", "", "jit(step)/jvp(AMiF.vqa)/AMiF.context/AMiF.fuse/fusion/text_layer_0/mlp/mul"]
  assert hlo["custom-call.45"][:2] == ["custom-call", "__cublas$lt$matmul"]
  assert "multiply.3" not in hlo and "p.1" not in hlo and "tuple.1" not in hlo
  path = _kernel_trace(tmp_path / "k.json.gz")
  s = trace.summarize(path, steps=1, hlo=hlo)
  assert dict((k, ms) for k, ms, _ in s["by_kind"]) == {
      "fusion": 4.0, "matmul": 4.5, "attention (fused)": 2.5, "random bits": 1.0,
      "other": 0.1}
  # Per model part, past the Flax methods (AMiF.context, ...): the fused add outside every
  # module is the optimiser's; the cuDNN kernels name nothing.
  assert dict((k, ms) for k, ms, _ in s["by_scope"]) == {
      "fusion": 4.0, "decoder": 4.0, "image": 1.5, "(unnamed)": 2.6}
  assert s["named_share"] == pytest.approx(9.6 / 12.1, abs=1e-4)
  assert s["arg_keys"] == ["correlation_id", "hlo_op", "tf_op"]
  # Without the table only the event that carries its name is placed.
  bare = trace.summarize(path, steps=1)
  assert dict((k, ms) for k, ms, _ in bare["by_scope"]) == {"(unnamed)": 10.6, "image": 1.5}
  assert "loop_multiply_fusion" not in bare["by_kind"]
  text = trace.format_summary(s)
  assert "79.3% of it named by JAX op" in text and "correlation_id, hlo_op, tf_op" in text


def test_the_hlo_table_of_a_real_compiled_step(tmp_path):
  """On this CPU's compiler: every named scope of a jitted gradient comes back from the
  table, with the launched fusions."""
  def f(a, b):
    with jax.named_scope("image"):
      c = jnp.tanh(a @ b) * 2
    with jax.named_scope("head"):
      return (c + 1).sum()
  g = jax.jit(jax.grad(f))
  text = g.lower(jnp.ones((32, 32)), jnp.ones((32, 32))).compile().as_text()
  hlo = trace.hlo_ops(text)
  assert hlo and all(len(row) == 3 for row in hlo.values())
  assert {"fusion"} <= {row[0] for row in hlo.values()}
  scopes = {trace.scope_of(row[2]) for row in hlo.values() if row[2]}
  assert "image" in scopes
  saved = trace.save_hlo_ops(hlo, str(tmp_path / "hlo_ops.json.gz"))
  assert trace.load_hlo_ops(saved) == hlo


def test_the_command_reads_the_hlo_table_beside_the_trace(tmp_path):
  path = _kernel_trace(tmp_path / "trace.json.gz")
  run = lambda *a: subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"),
                                   *a], capture_output=True, text=True, timeout=120)
  before = json.loads(run(path, "--json").stdout)
  assert dict((k, ms) for k, ms, _ in before["by_scope"])["(unnamed)"] == 10.6
  trace.save_hlo_ops(trace.hlo_ops(_HLO), str(tmp_path / "hlo_ops.json.gz"))
  after = json.loads(run(path, "--json").stdout)
  assert dict((k, ms) for k, ms, _ in after["by_scope"])["fusion"] == 4.0
  (tmp_path / "bad.json.gz").write_bytes(b"nope")
  out = run(path, f"--hlo={tmp_path / 'bad.json.gz'}")
  assert out.returncode == 1 and "not a readable HLO op table" in out.stderr
  out = run(path, f"--hlo={tmp_path / 'missing.json.gz'}")
  assert out.returncode == 1 and "missing.json.gz: no such file" in out.stderr


def test_array_bytes_of_every_dtype():
  """Item sizes: pred and the 8-bit types 1 byte (fp8's names: f8e4m3fn, f8e5m2, ...), bf16
  2, complex64 8, complex128 16."""
  assert trace.array_bytes("(pred[5], bf16[4], s8[3], f8e4m3fn[2,3], f8e5m2[2], c64[2], "
                           "c128[3], f32[2], s64[1])") == 5 + 8 + 3 + 6 + 2 + 16 + 48 + 8 + 8


def test_a_kernels_name_reads_dashes_as_underscores_too():
  """XLA names a kernel after its instruction with '.' and '-' as '_': custom-call.45's
  kernel is custom_call_45, and its events are the instruction's."""
  hlo = trace.hlo_ops(_HLO)
  assert hlo["custom_call_45"] == hlo["custom-call.45"]
