r"""Times the train step of a config and prints one JSON line.

  python launch/benchmark.py --config=configs/towers_only.py                # GPU/TPU
  python launch/benchmark.py --config=configs/pretrain_stage1.py:image=paper_init,text=paper_init \
      --batch_size=64
  python launch/benchmark.py --config=configs/towers_only.py:tiny --steps=5   # CPU smoke run
  python launch/benchmark.py --config=configs/demo.py --pipeline             # + input pipeline
  python launch/benchmark.py --config=configs/vqa_rad.py:image=paper_init,text=paper_init \
      --batch_size=128 --steps=0 --target=h100     # Does it fit an H100? (no GPU needed)

Builds the model of the config with random weights (towers from their `arch`), compiles the
loop's jitted step once, runs --warmup steps then --windows windows of --steps steps on
synthetic batches of the config's shapes (the step time: the median window's), and prints:
device kind and count, batch, compile time, step time, samples/s, model FLOPs per sample
(analytic; XLA's compiled count beside it, and `flops_check` says whether the two agree within
10% when the program is plain, on a CPU or TPU: reference attention, no scan, no remat, no
gradient accumulation), MFU against the device's dense bf16 peak (--peak_tflops for a device
not in the table), memory (XLA's compiled estimate, and the runtime peak where the backend
reports one), what the step moves between devices (`collectives`: ops and bytes per kind, as
compiled; on fake CPU devices, XLA_FLAGS=--xla_force_host_platform_device_count=N with
--steps=0, before a pod is at hand), the share of the step that the OT loss alone takes
(pre-training with wpa), and with --pipeline the share lost to the input pipeline (1 -
synthetic step time / step time fed by config.data). With --profile_dir, a trace of
--profile_steps more steps is written there (`trace.json.gz`, Chrome trace events; the
profiler's own files under `plugins/profile/`), and the device's time per step is split by
kind of work, by model part and by op (`summary.txt`; `device_busy_share`, `profile_by_kind`,
`profile_by_scope` in the line; a CPU trace has no device events to split). `hbm_traffic_gb`: what
the compiled step's kernels read and write, by kind and model part, and how many kernels it
runs (`kernels`; `small_kernels`: those moving under 1 MB, which cost about a launch each).
With --target=h100|h200 and --steps=0, the step is compiled for that GPU (--target_devices of
one host) on this machine, which needs no GPU but JAX's CUDA plugin (pip install
"jax[cuda13]==<jax's version>"): XLA's memory estimate, traffic and collectives of the GPU
program.
On several hosts, each process runs the command with launch/train.py's cluster flags (or
none, where the cluster is detected: medvqa_jax/train/distributed.py), feeds its share of
the global --batch_size, and process 0 prints the line.
A classifier head without num_answers gets 512 answers. Any config field is overridable,
e.g. --config.model.compute.attention=cudnn --config.model.compute.scan=True
--config.model.compute.remat=dots.
"""

import json

import common  # Puts the repository root on sys.path.
from absl import flags
from ml_collections import config_flags

_CONFIG = common.config_file_flag("configs/towers_only.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).",
                              lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per window (0: compile and count "
                              "FLOPs only).", lower_bound=0)
_WINDOWS = flags.DEFINE_integer("windows", 3, "Timed windows of --steps steps: the step time "
                                "is the median window's (of an even number, the mean of the "
                                "middle two).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps after compilation.", lower_bound=0)
_PIPELINE = flags.DEFINE_bool("pipeline", False, "Also time steps fed by the real input "
                              "pipeline of config.data.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak per device, TFLOP/s "
                           "(default: from the device kind).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Also trace --profile_steps steps "
                                   "there and summarise where the device's time goes.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Steps traced with --profile_dir.",
                                      lower_bound=1)
_TEACHER_DIM = flags.DEFINE_integer("teacher_dim", 512, "Width of the synthetic teacher "
                                    "embeddings (pre-training with a teacher).")
_TARGET = flags.DEFINE_enum("target", None, ["h100", "h200"], "Compile the step for this GPU "
                            "instead (--steps=0), here, without one: needs JAX's CUDA plugin "
                            "(medvqa_jax/train/aot.py).")
_TARGET_DEVICES = flags.DEFINE_integer("target_devices", 1, "With --target: GPUs of one host "
                                       "to compile for.", lower_bound=1)
_JOIN = common.cluster_flags()


def main(argv):
  del argv
  import os
  import sys

  from medvqa_jax.train import aot, benchmark
  if _TARGET.value:
    aot.prepare(_TARGET.value)  # Before JAX starts its backends.
  else:
    _JOIN()
  import jax
  log = lambda s: print(s, file=sys.stderr, flush=True)
  figures = benchmark.run(_CONFIG.value, batch_size=_BATCH.value, steps=_STEPS.value,
                          warmup=_WARMUP.value, windows=_WINDOWS.value,
                          pipeline=_PIPELINE.value, peak=_PEAK.value,
                          teacher_dim=_TEACHER_DIM.value, profile_dir=_PROFILE_DIR.value,
                          profile_steps=_PROFILE_STEPS.value, target=_TARGET.value,
                          target_devices=_TARGET_DEVICES.value, log=log)
  figures["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  # What else set the step up: the config's overrides and XLA's flags.
  figures["overrides"] = [a for a in sys.argv[1:] if a.startswith("--config.")]
  figures["xla_flags"] = os.environ.get("XLA_FLAGS") or None
  if jax.process_index() == 0:
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
  common.run(main)
