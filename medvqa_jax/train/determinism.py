"""Bitwise-repeatable GPU programs for a run (`train.deterministic`).

The same inputs give the same bits on a CPU. On a GPU, XLA's default programs need not (its
determinism notes name scatter, GEMMs, convolutions and multi-headed attention):
- a scatter-add (the gradient of an embedding lookup: the word, position and type tables of
  the text tower and the decoder) adds with atomics, in whatever order the threads arrive;
- cuDNN's fused attention backward and some matrix-product kernels have faster
  non-deterministic algorithms, which they use unless asked not to;
- autotuning picks kernels by timing the candidates, so another process (a resumed run) may
  compile other kernels, which sum in another order.
So two runs of one command, or a run and its resumption, can part in the last bits from the
first step on, and the difference grows with training. The options below make XLA compile the
deterministic implementations (BENCHMARKS.md: the fine-tuning step's scatters sorted and
summed in a fixed order, compiled for an H200) and pick kernels without timing them. They
apply to what a run compiles that decides its parameters and its choices: the train step,
the online teacher, validation and test prediction; and to `predict.py`'s and `embed.py`'s
programs, so that they answer and embed as the run's evaluation does. Their cost in step
time is the GPU's to tell: `launch/benchmark.py` with `--config.train.deterministic=True`
against without.
"""

from __future__ import annotations

# XLA's GPU compiler options (jax.jit's `compiler_options`; the same as XLA_FLAGS' names).
GPU_OPTIONS = {
    # Deterministic implementations only: scatter-adds sorted before they sum, cuDNN
    # attention's backward and the matrix products in their deterministic algorithms.
    "xla_gpu_exclude_nondeterministic_ops": True,
    # No autotuning: every compilation picks the same kernels (some XLA versions still
    # autotune under the option above).
    "xla_gpu_autotune_level": 0,
}
# A device's `platform` for CUDA and ROCm GPUs ("gpu"; "cuda" for a compile target).
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def compiler_options(config, mesh) -> dict | None:
  """The compiler options (jax.jit's) of a run's programs on `mesh`'s devices: XLA's
  deterministic GPU kernels where `train.deterministic` asks for them (a run recorded before
  the field existed did not); None elsewhere (they are XLA's GPU compiler's; a CPU's programs
  repeat already, as the suite's resume tests check)."""
  wanted = bool(config.train.get("deterministic", False))
  platform = mesh.devices.flat[0].platform  # A compile target's own where it is one.
  return dict(GPU_OPTIONS) if wanted and platform in GPU_PLATFORMS else None
