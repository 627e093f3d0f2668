"""Speed of the train step of a config: step time, throughput, FLOPs, MFU, memory, and the
shares of the step spent in Sinkhorn and in the input pipeline.

The state is built as the loop builds it (born sharded over every device, towers randomly
initialised from their `arch`), and the step is the loop's jitted step, compiled once ahead
of time. Batches are synthetic, of the shapes the config implies (random pixels, token ids
with random lengths, random teacher embeddings), placed on the devices once; with
`pipeline=True` the real input pipeline of `config.data` also feeds a second timed run.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medvqa_jax.data import augment
from medvqa_jax.models import amif
from medvqa_jax.models.state_dict import flatten
from medvqa_jax.train import aot, determinism
from medvqa_jax.train import flops as flops_lib
from medvqa_jax.train import optim, sharding
from medvqa_jax.train import step as step_lib
from medvqa_jax.train import trace as trace_lib

# Dense bf16 peak per chip, TFLOP/s, by a substring of `device_kind` (first match wins, so a
# longer name comes before its prefix: "L40S", "L40", "L4").
# None: a chip whose peak is not known here (MFU then needs --peak_tflops).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0),
    ("H200", 989.0), ("H800 PCIe", 756.0), ("H800", 989.0), ("GB200", 2500.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0),
    ("TPU v4 lite", None), ("TPU v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
  for name, value in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return value
  return None


def attention_kernels(compute, dtype, head_dims) -> str:
  """The attention kernel the layers use: one name ("cudnn"), or, where `attention=auto`
  keeps the reference for some head dims, each kernel with its head dims ("cudnn (head dim
  64); reference (head dim 36)")."""
  by_kernel = {}
  for dim in head_dims:
    by_kernel.setdefault(compute.kernel(dtype, dim), []).append(dim)
  if len(by_kernel) == 1:
    return next(iter(by_kernel))
  return "; ".join(f"{kernel} (head dim {', '.join(map(str, dims))})"
                   for kernel, dims in sorted(by_kernel.items()))


def _ids(rng, n, length, vocab, low=None):
  """(n, length) token ids with random real lengths, and the mask (right-padded)."""
  lengths = rng.integers(low or max(2, length // 3), length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, vocab, (n, length)).astype(np.int32) * mask
  return ids, mask


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_batch(config, model, batch_size: int, seed: int = 0,
                    teacher_dim: int = 512) -> dict:
  """A host batch (NumPy) of the shapes the loop feeds `config`'s step."""
  rng = np.random.default_rng(seed)
  mc = config.model
  size = model.image.image_size
  images = lambda: rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  ids, mask = _ids(rng, batch_size, mc.text.max_len, model.text.vocab_size)
  batch = {"images": images(), "input_ids": ids, "attention_mask": mask}
  if model.head == "none":
    # Pre-training views carry the blur the device applies: half of them, as drawn.
    blur = lambda: np.where(rng.random(batch_size) < 0.5,
                            rng.uniform(*augment.BLUR_SIGMA, batch_size), 0).astype(np.float32)
    batch["blur"] = blur()
    batch["image_key"] = np.arange(batch_size, dtype=np.uint32)  # Every picture its own.
    if dict(config.losses.weights).get("imvc", 0) > 0:
      batch["images2"], batch["blur2"] = images(), blur()
    if config.teacher.mode != "none":
      batch.update(teacher_image=_unit(rng, batch_size, teacher_dim),
                   teacher_image2=_unit(rng, batch_size, teacher_dim),
                   teacher_text=_unit(rng, batch_size, teacher_dim),
                   teacher_scale=np.float32(85.0))
  elif model.head == "generative":
    batch["answer_ids"], batch["answer_mask"] = _ids(rng, batch_size, mc.answer_max_len,
                                                     model.text.vocab_size, low=3)
  else:
    batch["labels"] = rng.integers(0, mc.num_answers, batch_size).astype(np.int32)
  return batch


def synthetic_prior(config, model, seed: int = 1):
  """Answer-prior ids and mask (the GCA's constant) of the configured size, 3/4 real."""
  rng = np.random.default_rng(seed)
  p = config.model.prior_max_tokens
  mask = (np.arange(p) < max(1, 3 * p // 4)).astype(np.int32)
  return rng.integers(5, model.text.vocab_size, p).astype(np.int32) * mask, mask


def _time(fn: Callable, n: int):
  """(seconds per call, last output) of n calls of fn(), blocking on the last output."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / max(n, 1), out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else {}
  return cost or {}


def _memory(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 30


def _peak_memory() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def sinkhorn_seconds(config, model, batch_size: int, mesh, steps: int, seed: int = 0):
  """Seconds per call of the word-patch OT loss alone (cost matrix, Sinkhorn, <C, P>) on
  float32 fused tokens of the step's shapes, and the solver's convergence rate."""
  from medvqa_jax.losses import ot
  rng = np.random.default_rng(seed + jax.process_index())
  d, li = model.width, flops_lib.image_tokens(model)
  local = batch_size // jax.process_count()  # This process's share of the global batch.
  _, mask = _ids(rng, local, config.model.text.max_len, 100)
  host = {"text": rng.normal(size=(local, mask.shape[1], d)).astype(np.float32),
          "image": rng.normal(size=(local, li, d)).astype(np.float32), "mask": mask}
  dev = sharding.shard_batch(mesh, host)
  fn = jax.jit(lambda b: ot.wpa_loss(b["text"], b["image"], b["mask"], **config.losses.ot))
  jax.block_until_ready(fn(dev))
  seconds, (_, metrics) = _time(lambda: fn(dev), steps)
  converged = metrics.get("wpa_converged")
  return seconds, None if converged is None else float(converged)


def flops_comparable(platform: str, kernel: str, compute, accum_steps: int) -> bool:
  """Whether XLA's count of the compiled step can be held to the analytic one. XLA counts
  remat's recomputation again, a scanned body once (scanned layers, accumulated
  micro-batches), and no custom call: neither cuDNN's attention nor, on a GPU, the matrix
  products, which run as cuBLAS calls (towers_only on an H200 with the reference attention:
  0.043x the analytic count; 1.009x on the CPU). So: the plain program, on a CPU or TPU."""
  return (platform in ("cpu", "tpu") and kernel == "reference" and not compute.scan
          and compute.remat == "none" and accum_steps == 1)


def _profile(one: Callable, steps: int, out_dir: str, step_s: float,
             log: Callable[[str], None], hlo_text: str | None = None) -> dict:
  """Traces `steps` steps into `out_dir`; the trace's path and, where the trace has device
  events, the device's busy time against the step time and its split by kind and scope.
  `hlo_text`: the compiled step's HLO, whose op table (`hlo_ops.json.gz`, kept beside the
  trace) names the device events that do not name their JAX op."""
  if jax.process_count() > 1:  # Each process traces its own devices, into its own folder.
    out_dir = os.path.join(out_dir, f"process_{jax.process_index()}")
  log(f"tracing {steps} steps into {out_dir}")
  figures = {"profile_trace": None, "device_busy_share": None, "profile_by_kind": None,
             "profile_by_scope": None}
  try:
    figures["profile_trace"] = path = trace_lib.capture(one, steps, out_dir)
  except Exception as e:  # noqa: BLE001  (the timed figures stand without the trace)
    log(f"tracing failed, the figures are printed without it: {type(e).__name__}: {e}")
    return figures
  hlo = None
  if hlo_text:
    try:
      hlo = trace_lib.hlo_ops(hlo_text)
      trace_lib.save_hlo_ops(hlo, os.path.join(out_dir, "hlo_ops.json.gz"))
    except OSError as e:
      log(f"the HLO op table was not kept ({e}); the summary uses it all the same")
  try:
    summary = trace_lib.summarize(path, steps=steps, hlo=hlo)
  except ValueError as e:
    log(f"no device time to summarise: {e}")
    return figures
  text = trace_lib.format_summary(summary)
  with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write(text + "\n")
  log(text)
  short = lambda rows: [[name, ms] for name, ms, _ in rows[:8]]
  figures.update(device_busy_share=round(summary["busy_ms"] / 1000 / step_s, 4),
                 profile_by_kind=short(summary["by_kind"]),
                 profile_by_scope=short(summary["by_scope"]))
  return figures


def params_digest(params) -> str:
  """The SHA-1 of parameters (each array's path, dtype, shape and bytes, in path order):
  two runs' digests are equal when their parameters are, bit for bit."""
  digest = hashlib.sha1()
  for path, x in sorted(flatten(jax.device_get(params)).items()):  # One copy to the host.
    x = np.asarray(x)
    digest.update(f"{path} {x.dtype} {x.shape}\n".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


def run(config, *, batch_size: int | None = None, steps: int = 20, warmup: int = 10,
        windows: int = 3, pipeline: bool = False, peak: float | None = None,
        teacher_dim: int = 512, pipeline_min_steps: int = 50,
        profile_dir: str | None = None, profile_steps: int = 5,
        target: str | None = None, target_devices: int = 1,
        log: Callable[[str], None] = lambda s: None) -> dict:
  """Builds, compiles and times the train step of `config`; returns the figures. After
  `warmup` steps, `windows` windows of `steps` steps are timed one after another: the step
  time is the median window's (`step_windows_ms` lists them all; on an H200, 20 steps timed
  after 3 warm-up steps took up to 22% longer than the same step timed later). The
  pipeline run takes max(steps, pipeline_min_steps) steps after 4 x data.workers warm-up
  steps (at least `warmup`): the workers' first batches come slower. With `profile_dir`,
  `profile_steps` more synthetic steps are traced there (`trace.capture`) and the device's
  time summarised (`trace.summarize`; `profile_dir/summary.txt`).

  With `steps=0` the step is compiled only, from the shapes of the state and batch (nothing is
  initialised). `target` ("h100", "h200"; `aot.TARGETS`) compiles it for `target_devices` such
  GPUs of one host, on any machine with JAX's CUDA plugin (`aot.prepare(target)` first):
  the memory, traffic and collectives of the GPU program, no times."""
  if windows < 1:
    raise ValueError(f"windows must be at least 1 (got {windows})")
  if target is not None and (steps or pipeline or profile_dir):
    raise ValueError(f"a step compiled for {target} cannot run here: pass steps=0 (no "
                     "pipeline, no profile)")
  devices = None if target is None else aot.devices(target, target_devices)
  device_count = jax.device_count() if devices is None else len(devices)
  tc, mc = config.train, config.model
  batch_size = batch_size or tc.batch_size
  tc.batch_size = batch_size
  step_lib.check_batch(config, batch_size, device_count)
  rng = step_lib.check_rng(tc.get("rng", "threefry"))  # Named before anything runs.
  step_lib.check_values(config)
  if mc.head == "none" and config.teacher.mode == "online":
    # The step reads the teacher's embeddings; online, a forward pass of the teacher's own
    # towers makes them before each step (teacher_feed.BatchTeacher), which would not be timed.
    raise ValueError("--config.teacher.mode=online: the benchmark times the train step, which "
                     "reads the teacher's embeddings (random ones here); the online teacher's "
                     "forward pass that makes them in training is not part of it. Time the "
                     "step with --config.teacher.mode=cache (the same step)")
  if pipeline and mc.head == "none" and config.teacher.mode != "none":
    raise ValueError("the pipeline run of a pre-training config would need the teacher's "
                     "cache: time it with --config.teacher.mode=none")
  if mc.head == "classifier" and not mc.get("num_answers"):  # Synthetic labels need a size.
    mc.num_answers = 512
  if not config.optim.get("total_steps"):  # A config counting in epochs: any schedule length.
    config.optim.total_steps = 10000
  for part in (mc.image, mc.text):
    if part.source != "init":
      raise ValueError(
          f"the benchmark initialises the towers randomly, from `arch` alone, but the "
          f"{part.kind} tower loads a {part.source} checkpoint: pick towers with random "
          f"weights, e.g. --config=configs/pretrain_stage1.py:image=paper_init,text=paper_init")
  mesh = sharding.make_mesh(tc.fsdp, devices)
  model, init, loaded = amif.initializer(config, seed=config.seed)
  if target is not None and amif.compute_of(config).attention == "auto":
    # As the layers would choose on the target, not on this machine's backend.
    mc.compute.attention = aot.attention(amif.compute_of(config), mc.dtype,
                                         amif.head_dims(model))
    model, init, loaded = amif.initializer(config, seed=config.seed)
  if pipeline:  # Its tokenizer and data before compiling: a missing one fails in seconds.
    from medvqa_jax.data import tokenizer as tokenizer_lib
    from medvqa_jax.train import loop
    tokenizer = tokenizer_lib.from_config(mc.text)
    tokenizer_lib.check_fits(tokenizer, {"text tower": model.text, "decoder": model.decoder})
    splits, answers, _ = loop.training_splits(config)
  shapes = jax.eval_shape(init, loaded)
  tx = optim.make(config.optim, shapes)
  shardings = step_lib.state_shardings(mesh, shapes, tx, tuple(tc.fsdp_rules), tc.fsdp_min_size)
  kind = mesh.devices.flat[0].device_kind
  log(f"building the state ({sum(x.size for x in jax.tree.leaves(shapes)) / 1e6:.1f}M "
      f"parameters) on {device_count} {kind} device(s)")
  if steps > 0:
    state = step_lib.create_state(init, tx, shardings, {})
  else:  # Compiled only: the shapes will do.
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": shapes, "opt_state": jax.eval_shape(tx.init, shapes),
         "step": jax.ShapeDtypeStruct((), np.int32)}, shardings)
  if mc.head == "none":
    objective = step_lib.pretrain_objective(model, config.losses)
  else:
    objective = step_lib.finetune_objective(model, *synthetic_prior(config, model))
  train_step = step_lib.make_train_step(
      objective, tx, shardings, tc.accum_steps, optim.frozen_mask(config.optim, shapes), rng,
      determinism.compiler_options(config, mesh))
  # This process's share of the global batch, as the loop's input gives it (each process
  # had made the whole batch, and shard_batch took it for its share: the step timed served
  # batch_size times the process count).
  processes = jax.process_count() if target is None else 1
  host = synthetic_batch(config, model, batch_size // processes,
                         config.seed + (jax.process_index() if target is None else 0),
                         teacher_dim)
  if steps > 0:
    batch = sharding.shard_batch(mesh, host)
    key = step_lib.base_key(0, rng, mesh)
  else:
    batch = {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)[1:]) if np.ndim(v) else (),
                                     np.asarray(v).dtype, sharding=sharding.batch_sharding(mesh, v))
             for k, v in host.items()}
    key = step_lib.base_key(0, rng)
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))

  log("compiling the train step")
  start = time.perf_counter()
  compiled = train_step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  hlo_text = compiled.as_text()
  analytic = flops_lib.train_step(model, config, batch_size, shapes, teacher_dim)
  # XLA counts one device's program, which computes the batch-independent work (the GCA's
  # prior) for its share of the batch: compared with the analytic count of that program
  # (against the model's FLOPs, 8 devices made the demo's count 2.5x the analytic one).
  per_device = batch_size // device_count
  as_compiled = flops_lib.train_step(model, config, batch_size, shapes, teacher_dim,
                                     shared_by=per_device)["total"]
  compiled_flops = _cost(compiled).get("flops")
  compiled_per_sample = None if compiled_flops is None else compiled_flops / per_device
  compute = amif.compute_of(config)
  kernel = attention_kernels(compute, mc.dtype, amif.head_dims(model))
  platform = jax.default_backend() if target is None else mesh.devices.flat[0].platform
  plain = flops_comparable(platform, kernel, compute, config.train.accum_steps)

  out = {
      "config": None, "device_kind": kind, "platform": platform,
      "target": target,  # Compiled for a GPU that is not here (aot.py), or None.
      "device_count": device_count,
      "process_count": jax.process_count() if target is None else 1, "jax": jax.__version__,
      "batch_size": batch_size, "per_device_batch": batch_size // device_count,
      "dtype": mc.dtype, "attention": kernel, "scan": compute.scan, "remat": compute.remat,
      "compile_s": round(compile_s, 2),
      "flops_per_sample": analytic["total"], "flops_source": "analytic",
      "compiled_flops_per_sample": compiled_per_sample,
      "compiled_over_analytic": (None if compiled_per_sample is None
                                 else round(compiled_per_sample / as_compiled, 4)),
      "flops_check": None,  # Where flops_comparable.
      "compiled_memory_gib": _memory(compiled),
      # What each device sends or receives per step, as compiled (trace.collectives).
      "collectives": trace_lib.collectives(hlo_text),
      # What the kernels read and write, by kind and model part (trace.hlo_traffic).
      "hbm_traffic_gb": trace_lib.gigabytes(trace_lib.hlo_traffic(hlo_text)),
  }
  if plain and compiled_per_sample:
    ratio = compiled_per_sample / as_compiled
    out["flops_check"] = "agree" if abs(ratio - 1) <= 0.10 else f"differ ({ratio:.3f}x)"
  if steps <= 0:
    return out

  def stepper(next_batch: Callable) -> Callable[[], dict]:
    """One step on next_batch(), returning its metrics."""
    def one():
      nonlocal state
      state, metrics = compiled(state, next_batch(), key, train_step.hyper)
      return metrics
    return one

  def timed(next_batch: Callable, warm: int, n: int) -> tuple[float, dict]:
    """Seconds per step over `n` steps after `warm` warm-up steps, and the last step's
    metrics."""
    one = stepper(next_batch)
    _time(one, warm)
    return _time(one, n)

  log(f"timing {windows} x {steps} steps on synthetic batches, after {warmup} warm-up steps")
  synthetic = stepper(lambda: batch)
  _time(synthetic, warmup)
  window_s, metrics = [], None
  for _ in range(windows):
    seconds, metrics = _time(synthetic, steps)
    window_s.append(seconds)
  step_s = float(np.median(window_s))
  loss = float(metrics["loss"])
  # The parameters after the warm-up and timed steps, from the seed's initial state: the same
  # command run twice on one device gives one digest where the device repeats the step bit for
  # bit (train.deterministic on a GPU; determinism.py). One process: another's arrays are
  # not here.
  digest = params_digest(state["params"]) if jax.process_count() == 1 else None
  peak = peak if peak is not None else peak_tflops(out["device_kind"])
  achieved = analytic["total"] * batch_size / step_s / jax.device_count()
  out.update(
      step_s=round(step_s, 5), samples_per_s=round(batch_size / step_s, 2),
      step_windows_ms=[round(1000 * x, 2) for x in window_s], warmup_steps=warmup,
      samples_per_s_per_device=round(batch_size / step_s / jax.device_count(), 2),
      # Four significant digits: a CPU's hundredths of a TFLOP/s lost a tenth to three
      # decimals (0.0125 printed as 0.012).
      achieved_tflops_per_device=float(f"{achieved / 1e12:.4g}"),
      peak_bf16_tflops_per_device=peak,
      mfu=None if not peak else round(achieved / (peak * 1e12), 4),
      peak_memory_gib=_peak_memory(), loss=loss, loss_finite=bool(np.isfinite(loss)),
      params_sha1=digest,
      sinkhorn_s=None, sinkhorn_share=None, sinkhorn_converged=None, sinkhorn_budget=None,
      step_wpa_converged=None, pipeline_step_s=None, data_share=None,
      pipeline_warmup_steps=None, pipeline_steps=None, profile_trace=None,
      device_busy_share=None, profile_by_kind=None, profile_by_scope=None)

  if mc.head == "none" and dict(config.losses.weights).get("wpa", 0) > 0:
    log("timing the OT loss alone")
    seconds, converged = sinkhorn_seconds(config, model, batch_size, mesh, steps)
    # To its threshold, Sinkhorn stops when its inputs let it: random tokens, near-uniform
    # costs, converge at the first test, so that share is a lower bound. A fixed budget (and
    # IPOT's iterations) is the same work whatever the tokens.
    ot_cfg = config.losses.ot
    if ot_cfg.solver == "ipot":
      budget = f"fixed {ot_cfg.ipot_iterations} (IPOT)"
    elif ot_cfg.min_iterations == ot_cfg.max_iterations:
      budget = f"fixed {ot_cfg.max_iterations}"
    else:
      budget = "to threshold (a lower bound: random tokens)"
    out.update(sinkhorn_s=round(seconds, 5), sinkhorn_share=round(seconds / step_s, 4),
               sinkhorn_converged=converged, sinkhorn_budget=budget,
               step_wpa_converged=(None if "wpa_converged" not in metrics
                                   else float(metrics["wpa_converged"])))

  if profile_dir:
    out.update(_profile(synthetic, profile_steps, profile_dir, step_s, log, hlo_text))

  if pipeline:
    from medvqa_jax.data import pipeline as pipeline_lib
    ds = loop.training_data(config, splits, answers, tokenizer, model.image.image_size)
    keep = set(host)
    with pipeline_lib.iterate(ds, num_workers=config.data.workers) as it:
      # As the training loop feeds its step: copied to the device tc.prefetch batches ahead.
      feed = sharding.prefetch(
          (sharding.shard_batch(mesh, {k: v for k, v in b.items() if k in keep}) for b in it),
          tc.get("prefetch", 2))
      fetch = lambda: next(feed)

      # The workers start up over their first batches: the rate is taken past them.
      pipe_warmup = max(warmup, 4 * config.data.workers)
      pipe_steps = max(steps, pipeline_min_steps)
      log(f"timing {pipe_steps} steps fed by the input pipeline ({config.data.workers} "
          f"workers), after {pipe_warmup} warm-up steps")
      pipe_s, _ = timed(fetch, pipe_warmup, pipe_steps)
      feed.close()
    out.update(pipeline_step_s=round(pipe_s, 5),
               data_share=round(max(0.0, 1 - step_s / pipe_s), 4),
               pipeline_warmup_steps=pipe_warmup, pipeline_steps=pipe_steps)
  return out
