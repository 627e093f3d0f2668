"""launch/benchmark.py: the JSON line it prints on CPU, the analytic FLOP count against XLA's
own count, the Sinkhorn and input-pipeline shares."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.vit import VisionTransformer
from medvqa_jax.train import benchmark
from medvqa_jax.train import flops as flops_lib

ROOT = Path(__file__).resolve().parents[2]

KEYS = {"config", "device_kind", "platform", "device_count", "batch_size", "compile_s",
        "step_s", "samples_per_s", "flops_per_sample", "flops_source",
        "compiled_flops_per_sample", "compiled_over_analytic", "flops_check", "mfu",
        "peak_bf16_tflops_per_device", "compiled_memory_gib", "peak_memory_gib",
        "sinkhorn_share", "data_share", "attention", "scan", "remat", "loss", "collectives",
        "hbm_traffic_gb", "target", "params_sha1"}


def test_counts_below_their_least_are_refused():
  # --batch_size=0 ran the config's batch and --steps=-1 compiled only, without a word.
  for flag in ("--batch_size=0", "--steps=-1", "--windows=0", "--warmup=-1"):
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"),
                          "--config=configs/towers_only.py:tiny", flag], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"flag {flag}: " in out.stderr, (flag, out.stderr[-2000:])


def test_benchmark_prints_one_well_formed_line(tmp_path):
  out = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "benchmark.py"),
       "--config=configs/towers_only.py:tiny", "--steps=3", "--warmup=1", "--windows=2",
       f"--profile_dir={tmp_path / 'prof'}", "--profile_steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout
  r = json.loads(lines[0])
  assert KEYS <= set(r)
  assert r["config"] == "configs/towers_only.py:tiny" and r["platform"] == "cpu"
  assert r["batch_size"] == 8 and r["device_count"] == 1
  # Rates are printed to hundredths: on a slow step that is more than a thousandth.
  assert r["samples_per_s"] == pytest.approx(8 / r["step_s"], rel=1e-3, abs=0.01)
  # Two timed windows; the step time is their median (with two: their mean).
  assert len(r["step_windows_ms"]) == 2 and r["warmup_steps"] == 1
  assert 1000 * r["step_s"] == pytest.approx(np.mean(r["step_windows_ms"]), abs=0.02)
  assert r["flops_source"] == "analytic" and r["flops_check"] == "agree"
  assert 0.9 <= r["compiled_over_analytic"] <= 1.1
  assert r["mfu"] is None and r["peak_bf16_tflops_per_device"] is None  # No CPU peak.
  assert r["compiled_memory_gib"] > 0 and np.isfinite(r["loss"])
  assert r["sinkhorn_share"] is None and r["data_share"] is None
  assert r["collectives"] == {}  # One device: nothing to move.
  traffic = r["hbm_traffic_gb"]  # What the kernels read and write, by kind and model part.
  assert r["target"] is None and traffic["total"] > 0
  assert {"image", "text"} <= set(traffic["by_scope"]) and "matmul" in traffic["by_kind"]
  assert 0 <= traffic["small_kernels"] < traffic["kernels"]
  assert "compiling the train step" in out.stderr  # Progress goes to stderr.
  # The traced step is kept; a CPU trace has no device events to split, which it says.
  assert r["profile_trace"] == str(tmp_path / "prof" / "trace.json.gz")
  assert Path(r["profile_trace"]).stat().st_size > 0 and r["device_busy_share"] is None
  assert "no device events" in out.stderr
  # Beside it, the compiled step's op table that names a GPU's kernels: the towers are there.
  from medvqa_jax.train import trace
  ops = trace.load_hlo_ops(str(tmp_path / "prof" / "hlo_ops.json.gz"))
  assert {"image", "text"} <= {trace.scope_of(row[2]) for row in ops.values()}


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("tower", ["vit", "clip_text", "bert"])
def test_analytic_tower_flops_match_xla(tower):
  """The forward count of each tower against XLA's count of the compiled forward pass (which
  also counts elementwise work, a few percent at these widths)."""
  if tower == "vit":
    module = VisionTransformer(image_size=64, patch_size=8, width=256, depth=2, num_heads=4,
                               mlp_dim=1024)
    x = (jnp.zeros((2, 64, 64, 3)),)
    ours = flops_lib.tower(module)
  else:
    kind = ClipTextTransformer if tower == "clip_text" else BertEncoder
    extra = dict(context_length=64) if tower == "clip_text" else dict(max_positions=64)
    module = kind(vocab_size=500, width=256, depth=2, num_heads=4, mlp_dim=1024, **extra)
    x = (jnp.ones((2, 64), jnp.int32),)
    ours = flops_lib.tower(module, 64)
  params = module.init(jax.random.PRNGKey(0), *x)["params"]
  theirs = _xla_flops(lambda p, *x: module.apply({"params": p}, *x)["pooled"], params, *x) / 2
  assert 0.93 <= theirs / ours <= 1.1, (theirs, ours)


def test_the_image_towers_patches_and_tokens_are_counted_exactly():
  """Below XLA's 10% tolerance, worked out by hand for a 64 px image of 8 px patches: the
  patch embedding is a (64 patches, 8 * 8 * 3) x (8 * 8 * 3, width) product, 2 FLOPs per
  multiply-add; the fusion and the GCA read the tower's 8 * 8 patch tokens and its CLS
  token, as many as the tower gives out."""
  import types
  module = VisionTransformer(image_size=64, patch_size=8, width=256, depth=2, num_heads=4,
                             mlp_dim=1024)
  segments = flops_lib.tower_segments(module)
  assert segments[0] == 2 * 64 * (8 * 8 * 3) * 256
  assert segments[1:] == [flops_lib.layer(65, 256, 1024)] * 2
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
  out = jax.eval_shape(lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0], images)
  assert flops_lib.image_tokens(types.SimpleNamespace(image=module)) == \
      out["tokens"].shape[1] == 65


def test_a_tower_training_its_final_norm_alone_takes_the_losss_gradient():
  """Only the image tower's final LayerNorm trains (no FLOPs of its own counted): the loss's
  gradient still crosses the contrastive similarities (3x their forward) and the frozen image
  projection (2x: to its inputs) to reach it, where with everything frozen each is 1x."""
  from configs import towers_only
  from medvqa_jax.models import amif

  def count(*mults):
    config = towers_only.get_config("tiny")
    config.optim.lr_mults = mults
    model, shapes = amif.create(config, abstract=True)
    return model, flops_lib.train_step(model, config, 8, shapes)

  model, frozen = count((".*", 0.0))
  _, final_norm = count(("image/ln_final/.*", 1.0), (".*", 0.0))
  d = model.width
  similarities = 2 * 8 * d  # One image-text matrix of the batch of 8, per example.
  projection = 2 * model.image.width * d  # The pooled image feature's.
  assert final_norm["total"] - frozen["total"] == 2 * similarities + projection


def test_the_two_views_similarities_are_counted():
  """The multi-view term (imvc) compares the batch's two views: one more similarity matrix
  (2 x batch x width FLOPs per example), too small for XLA's agreement check to see."""
  from configs import towers_only
  from medvqa_jax.models import amif

  def count(imvc):
    config = towers_only.get_config("tiny")
    config.losses.weights = dict(config.losses.weights, imvc=imvc)
    model, shapes = amif.create(config, abstract=True)
    return model, flops_lib.train_step(model, config, 8, shapes)
  model, without = count(0.0)
  _, with_views = count(1.0)
  assert with_views["forward"]["losses"] - without["forward"]["losses"] == 2 * 8 * model.width


def test_collectives_per_step_on_two_devices():
  """On two (fake) devices the line lists what the step moves between them: the data-parallel
  gradient all-reduce carries every parameter's gradient once, in float32 (the towers_only
  step trains them all), but the attention key biases', a constant zero (the softmax cancels
  them: layers.Projection); the contrastive loss all-gathers the embeddings of the global
  batch."""
  out = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "benchmark.py"),
       "--config=configs/towers_only.py:tiny", "--steps=1", "--warmup=1", "--windows=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": helpers.xla_flags(2)})
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["device_count"] == 2
  # Per device: half the batch, half the samples, half the work of the step (XLA counts one
  # device's program: per sample, that times the devices over the batch).
  assert r["batch_size"] == 8 and r["per_device_batch"] == 4
  # Rates are printed to hundredths (each rounded on its own), the step time to 1e-5 s.
  assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"] / 2, rel=1e-3,
                                                        abs=0.01)
  assert r["achieved_tflops_per_device"] == pytest.approx(
      r["flops_per_sample"] * 8 / r["step_s"] / 2 / 1e12, rel=2e-3)
  assert r["flops_check"] == "agree", r["compiled_over_analytic"]
  from configs import towers_only
  from medvqa_jax.models import amif
  from medvqa_jax.models.state_dict import flatten
  _, shapes = amif.create(towers_only.get_config("tiny"), abstract=True)
  grad_bytes = 4 * sum(int(np.prod(x.shape)) for path, x in flatten(shapes).items()
                       if not path.endswith("/key/bias"))
  reduced = r["collectives"]["all-reduce"]["bytes"]
  # Beside them: scalars, and one 2 x 128 table's gradient moved as 8 x 128: 0.08% more.
  assert grad_bytes <= reduced <= 1.01 * grad_bytes, (reduced, grad_bytes)
  assert r["collectives"]["all-gather"]["bytes"] > 0


def test_two_processes_time_the_global_batch_they_share():
  """Two joined processes (one device each), --batch_size=8: each feeds its 4 examples of the
  global batch (each fed 8, taken for its share: the step timed ran on 16, so the rates were
  half what they were) and process 0 prints the line. XLA's count of one device's program is
  compared with the analytic count of that program, where every device computes the GCA's
  batch-independent prior (compared with the model's FLOPs, the demo said "differ (1.3x)"
  here, 2.5x on 8 devices)."""
  procs = helpers.start_two_processes(
      [sys.executable, str(ROOT / "launch" / "benchmark.py"), "--config=configs/demo.py",
       "--batch_size=8", "--steps=1", "--warmup=0", "--windows=1", "--peak_tflops=0.5"],
      {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": helpers.xla_flags(1)}, ROOT)
  with helpers.reaped(procs):
    outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # (Gloo, XLA's CPU collectives, prints its connections to stdout: not JSON lines.)
  lines = [[x for x in out.splitlines() if x.startswith("{")] for out, _ in outs]
  assert len(lines[0]) == 1 and lines[1] == [], outs
  r = json.loads(lines[0][0])
  assert (r["process_count"], r["device_count"], r["batch_size"], r["per_device_batch"]) == \
      (2, 2, 8, 4)
  assert r["flops_check"] == "agree", r["compiled_over_analytic"]
  assert r["samples_per_s"] == pytest.approx(8 / r["step_s"], rel=1e-3, abs=0.01)
  # The rate per device, and MFU against one device's peak: the global batch's FLOPs over
  # the two devices.
  per_device = r["flops_per_sample"] * 8 / r["step_s"] / 2 / 1e12
  assert r["achieved_tflops_per_device"] == pytest.approx(per_device, rel=2e-3)
  assert r["mfu"] == pytest.approx(per_device / 0.5, rel=2e-3, abs=6e-5)


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA B200", 2250.0),
    ("NVIDIA H800", 989.0), ("NVIDIA L40S", 362.0), ("TPU v6 lite", 918.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v4", 275.0)])
def test_peak_table_holds_the_vendors_dense_bf16_figures(kind, tflops):
  """The datasheets' dense (not 2:4 sparse) bf16 figures per chip, as JAX names the device."""
  assert benchmark.peak_tflops(kind) == tflops


def test_peak_table_names_the_devices():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert benchmark.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert benchmark.peak_tflops("NVIDIA H200") == 989.0
  assert benchmark.peak_tflops("NVIDIA H100 NVL") == 835.0
  assert benchmark.peak_tflops("NVIDIA H200 NVL") == 835.0  # Not the SXM part's 989.
  # A longer name is matched before its prefix.
  assert [benchmark.peak_tflops(f"NVIDIA {n}") for n in ("L40S", "L40", "L4")] == \
      [362.0, 181.0, 121.0]
  assert benchmark.peak_tflops("NVIDIA H800 PCIe") == 756.0  # Not the SXM part's 989.
  assert benchmark.peak_tflops("NVIDIA GB200") == 2500.0  # Not B200's 2,250.
  assert benchmark.peak_tflops("TPU v4 lite") is None  # Not v4's 275: unknown here.
  assert benchmark.peak_tflops("TPU v5 lite") == 197.0
  assert benchmark.peak_tflops("TPU v5") == 459.0
  assert benchmark.peak_tflops("cpu") is None


def test_pretraining_step_reports_the_sinkhorn_share(monkeypatch):
  from configs import pretrain_stage1
  config = pretrain_stage1.get_config("image=tiny,text=tiny,teacher=tiny")
  # Wide enough that matrix multiplications dominate XLA's count (as at paper size).
  config.model.image.arch.update(image_size=128, patch_size=16, width=256, num_heads=4,
                                 mlp_dim=1024)
  config.model.text.arch.update(width=256, num_heads=4, mlp_dim=1024)
  config.model.text.max_len = 32
  config.model.fusion.update(width=256, layers=1, heads=4, mlp_dim=1024)
  # The steps and the solver run; the seconds they report are set here (the step 0.2 s,
  # the solver 0.05 s a call), so that the share can be checked: the solver's over the step's.
  calls = _timed_calls(monkeypatch, [0.0, 0.2, 0.05])
  r = benchmark.run(config, batch_size=8, steps=2, warmup=1, windows=1, peak=0.5,
                    teacher_dim=32)
  assert calls == [1, 2, 2] and r["step_s"] == 0.2 and r["sinkhorn_s"] == 0.05
  assert r["sinkhorn_share"] == 0.25
  assert r["loss_finite"] and 0 <= r["sinkhorn_converged"] <= 1
  # Run to its threshold on random tokens, the solver's share is a lower bound: it says so,
  # beside the step's own convergence rate.
  assert r["sinkhorn_budget"] == "to threshold (a lower bound: random tokens)"
  assert 0 <= r["step_wpa_converged"] <= 1
  # Against the given peak: MFU is the achieved rate over it (each rounded: the rate to four
  # significant digits, MFU to four decimals). The rate had three decimals, 4% of a CPU's.
  assert r["mfu"] == pytest.approx(r["achieved_tflops_per_device"] / 0.5, rel=1e-3, abs=6e-5)
  # Frozen towers (stage 1) cost their forward pass only, in the analytic count and, thanks
  # to the step's stop_gradient mask, in XLA's count too (1.6x more without the mask).
  assert r["flops_check"] == "agree", r["compiled_over_analytic"]
  # An online teacher's forward pass is outside the step: not timed, so refused (it timed
  # the cached teacher's step under the online teacher's name).
  config.teacher.mode = "online"
  with pytest.raises(ValueError, match=r"teacher.mode=online: the benchmark times the train "
                                       r"step.* --config.teacher.mode=cache"):
    benchmark.run(config, batch_size=8, steps=0)


def _timed_calls(monkeypatch, seconds=None) -> list[int]:
  """The step counts `benchmark._time` is called with, in order (it runs the calls as ever);
  `seconds`: what each call reports measuring, in order (default: what it measured)."""
  calls, real, seconds = [], benchmark._time, iter(seconds or ())

  def timed(fn, n):
    calls.append(n)
    measured, out = real(fn, n)
    return next(seconds, measured), out
  monkeypatch.setattr(benchmark, "_time", timed)
  return calls


def test_pipeline_share_on_the_demo_data(tmp_path, monkeypatch):
  from configs import demo
  config = demo.get_config()
  config.data.dir = str(tmp_path / "data")
  # A part of the demo's data (helpers.demo_part), built in a fraction of the time.
  config.data.source_dir = str(helpers.demo_part(tmp_path / "source"))
  config.data.workers = 1
  calls = _timed_calls(monkeypatch)
  r = benchmark.run(config, batch_size=16, steps=3, warmup=1, windows=1, pipeline=True,
                    pipeline_min_steps=6)
  # Warm-up steps, then the timed synthetic window; the pipeline's warm-up, then its timed
  # steps: each warm-up run apart, outside the timed figures.
  assert calls == [1, 3, 4, 6]
  assert r["pipeline_step_s"] > 0 and 0 <= r["data_share"] < 1
  # Timed past the workers' start-up (their first batches came 1.4-3.3x slower), over more
  # steps than the synthetic run (50 by default; 6 here, to keep the test short).
  assert r["pipeline_warmup_steps"] == 4
  assert r["pipeline_steps"] == 6
  assert r["data_share"] == pytest.approx(max(0, 1 - r["step_s"] / r["pipeline_step_s"]),
                                          abs=1e-3)


def test_a_failed_trace_leaves_the_timed_figures(tmp_path, monkeypatch):
  """The profiler may be unavailable where the figures are taken (a GPU without profiling
  permissions): the line is printed without the trace, saying why."""
  from medvqa_jax.train import trace

  def refuse(*args, **kwargs):
    raise RuntimeError("profiler unavailable")

  monkeypatch.setattr(trace, "capture", refuse)
  from configs import towers_only
  logged = []
  r = benchmark.run(towers_only.get_config("tiny"), steps=1, warmup=0, windows=1,
                    profile_dir=str(tmp_path / "prof"), log=logged.append)
  assert r["samples_per_s"] > 0 and r["profile_trace"] is None
  assert any("tracing failed, the figures are printed without it: RuntimeError: profiler "
             "unavailable" in line for line in logged)


def test_the_step_time_is_the_median_window_after_the_warm_up(monkeypatch):
  """The warm-up steps run first, untimed; each window's seconds per step is what `_time`
  measured, and the step time their median."""
  from configs import towers_only
  calls = _timed_calls(monkeypatch, [0.0, 0.3, 0.1, 0.2])  # Warm-up, three windows.
  r = benchmark.run(towers_only.get_config("tiny"), steps=2, warmup=3, windows=3)
  assert calls == [3, 2, 2, 2]
  assert r["step_windows_ms"] == [300.0, 100.0, 200.0] and r["step_s"] == 0.2
  assert r["samples_per_s"] == 40.0 and r["warmup_steps"] == 3


def test_compiled_memory_counts_a_donated_buffer_once():
  """Arguments + outputs + temporaries, less what the outputs alias (the train step donates
  its state, which its output reuses), in GiB (2^30 bytes)."""
  x = jnp.zeros((1 << 20,), jnp.float32)  # 4 MiB.
  donated = jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile()
  kept = jax.jit(lambda x: x + 1).lower(x).compile()
  assert benchmark._memory(donated) == pytest.approx(4 / 1024, rel=0.01)
  assert benchmark._memory(kept) == pytest.approx(8 / 1024, rel=0.01)


def test_the_flops_check_is_left_out_where_xla_cannot_see_the_work():
  from medvqa_jax.models import layers
  plain = layers.Compute()
  assert benchmark.flops_comparable("cpu", "reference", plain, 1)
  assert benchmark.flops_comparable("tpu", "reference", plain, 1)
  # On a GPU the matrix products are cuBLAS custom calls, which XLA's count leaves out.
  assert not benchmark.flops_comparable("gpu", "reference", plain, 1)
  for kernel, compute, accum in (("cudnn", plain, 1), ("xla", plain, 1),
                                 ("reference", layers.Compute(scan=True), 1),
                                 ("reference", layers.Compute(remat="dots"), 1),
                                 ("reference", plain, 2)):
    assert not benchmark.flops_comparable("cpu", kernel, compute, accum)


def test_checkpoint_towers_are_refused_with_a_hint():
  from configs import vqa_rad
  with pytest.raises(ValueError, match="paper_init"):
    benchmark.run(vqa_rad.get_config(), steps=0)
  with pytest.raises(ValueError, match="windows must be at least 1"):
    benchmark.run(vqa_rad.get_config(), windows=0)


def test_accumulated_micro_batches_are_not_compared():
  """With train.accum_steps=2 the step scans over the micro-batches and XLA counts the scanned
  body once (half the step's work): its count is not comparable, so no flops_check (it said
  "differ" of a right analytic count)."""
  from configs import demo
  config = demo.get_config()
  config.train.accum_steps = 2
  r = benchmark.run(config, batch_size=16, steps=0)
  assert 0.4 <= r["compiled_over_analytic"] <= 0.6
  assert r["flops_check"] is None


def test_the_line_names_the_kernel_of_each_head_dim(monkeypatch):
  """`attention` reports the kernel each attention layer runs: with attention=auto on a GPU
  (faked: backend name and compute capability), a fusion of head dim 4, which cuDNN's flash
  kernel refuses, keeps the reference while the towers and decoder (head dim 16) take cuDNN.
  The line said "cudnn" for the whole model."""
  from configs import demo
  from medvqa_jax.models import amif, layers
  config = demo.get_config()
  config.model.fusion.heads = 16  # Width 64: head dim 4.
  model, _, _ = amif.initializer(config, seed=0)
  assert amif.head_dims(model) == [4, 16]
  config.model.fusion.heads = 4
  assert amif.head_dims(amif.initializer(config, seed=0)[0]) == [16]
  device = type("Device", (), {"compute_capability": "9.0"})()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [device])
  auto = layers.Compute(attention="auto")
  assert benchmark.attention_kernels(auto, jnp.bfloat16, [4, 16]) == \
      "cudnn (head dim 16); reference (head dim 4)"
  assert benchmark.attention_kernels(auto, jnp.bfloat16, [16, 64]) == "cudnn"
  assert benchmark.attention_kernels(auto, jnp.float32, [4, 16]) == "reference"
  assert benchmark.attention_kernels(layers.Compute(attention="xla"), jnp.bfloat16, [4]) == "xla"


def test_a_pipeline_run_without_a_tokenizer_fails_before_compiling(tmp_path):
  """The pipeline run resolved its tokenizer after compiling and timing the synthetic steps:
  gpu_session.sh's fine-tuning run (paper_init towers, which name no tokenizer) spent its
  budget, then failed without a line. It now fails first."""
  from configs import demo
  config = demo.get_config()
  config.model.text.tokenizer = None
  logged = []
  with pytest.raises(ValueError, match="the text tower has no tokenizer folder"):
    benchmark.run(config, batch_size=8, steps=1, pipeline=True, log=logged.append)
  assert not any("compiling" in line for line in logged)


def test_the_gpu_sessions_fine_tuning_run_has_a_tokenizer_that_fits(tmp_path):
  """What gpu_session.sh's fine-tuning run (--pipeline) gives the paper_init text tower: a
  tokenizer folder, and a word table its ids fit (an id past the table embeds as NaN)."""
  from configs import vqa_rad
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import amif
  plan = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--plan", "finetune"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "OUT_DIR": str(tmp_path / "out")})
  (command,) = [line for line in plan.stdout.splitlines() if "launch/benchmark.py" in line]
  flags = dict(re.findall(r"--config\.(model\.text\.[\w.]+)=(\S+)", command))
  assert set(flags) == {"model.text.tokenizer", "model.text.arch.vocab_size"}
  config = vqa_rad.get_config("image=paper_init,text=paper_init")
  config.model.text.tokenizer = str(ROOT / flags["model.text.tokenizer"])
  config.model.text.arch.vocab_size = int(flags["model.text.arch.vocab_size"])
  model, _, _ = amif.initializer(config, seed=0)
  tokenizer = tokenizer_lib.from_config(config.model.text)
  tokenizer_lib.check_fits(tokenizer, {"text tower": model.text, "decoder": model.decoder})
  assert tokenizer(["is there a fracture?"])["input_ids"].max() < model.text.vocab_size


def test_a_frozen_decoder_counts_the_backward_pass_to_its_inputs():
  """A frozen answer decoder was counted forward only, but the loss's gradient crosses it to
  the GCA and fusion: XLA counted 1.4x the analytic figure. From its first cross-attention
  layer on it costs 2x; the layers below it (the answer tokens alone) 1x."""
  from configs import demo
  config = demo.get_config()
  config.optim.lr_mults = (("decoder/.*", 0.0),)
  r = benchmark.run(config, batch_size=8, steps=0)
  assert r["flops_check"] == "agree", r["compiled_over_analytic"]


def test_each_layer_is_counted_trained_or_frozen_on_its_own():
  """A part was counted trained when any of it trained (a tower frozen below block 1 cost
  3x throughout: XLA counted 0.80x the analytic figure). Layers below every trained one cost
  their forward pass (1x), frozen ones above a trained one 2x (the gradient passes)."""
  from configs import demo, towers_only
  from medvqa_jax.models import amif
  lower = r"image/(patch_embed/.*|cls_token|pos_embed|ln_pre/.*|block_0/.*)"

  def count(config, *mults):
    config.optim.lr_mults = mults
    model, shapes = amif.create(config, abstract=True)
    return model, flops_lib.train_step(model, config, 8, shapes)

  model, whole = count(towers_only.get_config("tiny"))
  _, frozen = count(towers_only.get_config("tiny"), (lower, 0.0))
  patch, block_0 = flops_lib.tower_segments(model.image)[:2]
  assert whole["total"] - frozen["total"] == 2 * (patch + block_0)
  assert frozen["frozen"] == ["image"] and whole["frozen"] == []
  # A frozen fusion between trained towers and a trained GCA: its inputs' gradient (2x).
  _, tuned = count(demo.get_config())
  _, fusion = count(demo.get_config(), ("fusion/.*", 0.0))
  assert tuned["total"] - fusion["total"] == tuned["forward"]["fusion"] > 0
  # Frozen above a trained layer: 2x.
  _, upper = count(demo.get_config(), ("text/layer_1/.*", 0.0))
  assert tuned["total"] - upper["total"] == tuned["forward"]["text"] / 2
  config = towers_only.get_config("tiny")
  config.optim.lr_mults = ((lower, 0.0),)
  r = benchmark.run(config, batch_size=8, steps=0)
  assert r["flops_per_sample"] == frozen["total"]
  assert r["flops_check"] == "agree", r["compiled_over_analytic"]


def test_the_lm_head_is_counted_at_the_positions_that_predict_a_token():
  """The generative head's vocabulary logits cost 2 x width x vocabulary FLOPs at each of
  the answer_max_len - 1 positions that predict a token, forward; 3x that trained. (XLA's
  count, within 10%, cannot tell one position more.)"""
  from configs import demo
  from medvqa_jax.models import amif
  config = demo.get_config()
  model, shapes = amif.create(config, abstract=True)
  dec, la = model.decoder, config.model.answer_max_len
  wider = model.clone(decoder=dec.clone(vocab_size=dec.vocab_size + 1000))
  base, more = (flops_lib.train_step(m, config, 8, shapes) for m in (model, wider))
  logits = 2 * (la - 1) * dec.width * 1000
  assert {k: more["forward"][k] - base["forward"][k] for k in base["forward"]} == {
      **{k: 0 for k in base["forward"]}, "head_cross": logits}
  assert more["total"] - base["total"] == 3 * logits


def test_the_parameters_digest_is_equal_for_equal_parameters_only():
  params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "b": np.ones(3, np.float32)}
  digest = benchmark.params_digest(params)
  assert re.fullmatch("[0-9a-f]{40}", digest)
  assert benchmark.params_digest(jax.tree.map(np.copy, params)) == digest
  nudged = jax.tree.map(np.copy, params)
  nudged["b"][1] = np.nextafter(np.float32(1), np.float32(2))  # One ulp.
  assert benchmark.params_digest(nudged) != digest
  renamed = {"a": params["a"], "c": params["b"]}  # The same bytes under another path.
  assert benchmark.params_digest(renamed) != digest
  assert benchmark.params_digest({**params, "b": params["b"].reshape(1, 3)}) != digest


def test_two_runs_of_one_command_end_at_one_digest_on_the_cpu():
  """params_sha1 is the parameters' after the steps run from the seed's state: a CPU repeats
  them (two runs, one digest), and one step more ends elsewhere."""
  from configs import towers_only
  run = lambda warmup: benchmark.run(towers_only.get_config("tiny"), steps=1, warmup=warmup,
                                     windows=1)["params_sha1"]
  first = run(0)
  assert run(0) == first != run(1)


def test_compiling_only_builds_the_step_the_timed_run_compiles():
  """With steps=0 the step is compiled from the state's and batch's shapes, nothing
  initialised: the same program as the timed run's (the same memory and traffic), without
  the timed run's figures."""
  from configs import towers_only
  only = benchmark.run(towers_only.get_config("tiny"), steps=0)
  timed = benchmark.run(towers_only.get_config("tiny"), steps=1, warmup=0, windows=1)
  assert only["compiled_memory_gib"] == timed["compiled_memory_gib"] > 0
  assert only["hbm_traffic_gb"] == timed["hbm_traffic_gb"]
  assert only["compiled_flops_per_sample"] == timed["compiled_flops_per_sample"]
  assert "step_s" not in only and timed["step_s"] > 0


def test_a_step_compiled_for_another_gpu_is_not_run_here():
  from configs import towers_only
  for kw in (dict(steps=1), dict(steps=0, pipeline=True), dict(steps=0, profile_dir="p")):
    with pytest.raises(ValueError, match="compiled for h200 cannot run here"):
      benchmark.run(towers_only.get_config("tiny"), target="h200", **kw)
  with pytest.raises(ValueError, match="unknown target 'a100'; expected one of"):
    benchmark.run(towers_only.get_config("tiny"), steps=0, target="a100")
