"""Compiling a train step for a GPU that is not here (ahead of time, without a device).

XLA's GPU compiler runs on any host once JAX's CUDA plugin is installed (`pip install
"jax[cuda13]==<the installed jax's version>"`; no GPU, driver or network needed): given a
description of the target chip, it compiles the step as it would on that chip, with its
fusions, its library calls (cuBLAS, cuDNN's fused attention) and its buffer assignment. What
that answers without a GPU: whether a config and batch fit in the chip's memory (XLA's
estimate: within 1.5% of an H200's measured peaks, BENCHMARKS.md), how much the
step moves through HBM and in which part of the model (`trace.hlo_traffic`), and what it
communicates across N GPUs. It does not time anything: kernels are not autotuned (Triton's
GEMM fusions are switched off, so matrix products go to cuBLAS, as the H200 profiles show).

Used by `launch/benchmark.py --target=h200 --steps=0`.
"""

from __future__ import annotations

import os

import jax

# Each chip as XLA's GPU compiler describes it (its TargetConfig): the figures NVIDIA
# publishes for the SXM parts (132 SMs at up to 1.98 GHz, 228 KiB of shared memory per SM,
# 50 MiB of L2) and the memory each reports (81,559 and 143,771 MiB), with a cuDNN 9 and
# CUDA 13 runtime.
_GPU = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
runtime_version {{
  major: 13
  minor: 0
}}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _GPU.format(name="NVIDIA H100 80GB HBM3", bandwidth=3_352_000_000_000,
                        memory=85_520_809_984),
    "h200": _GPU.format(name="NVIDIA H200", bandwidth=4_800_000_000_000,
                        memory=150_754_820_096),
}
# What the compiler needs besides the target: the CUDA plugin's version check would look for
# a driver; Triton's GEMM fusions need autotuning to find tile sizes, which needs a device.
_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def check_target(target: str) -> str:
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}")
  return target


def prepare(target: str) -> None:
  """Sets the environment the compiler needs for `target`; call before JAX starts its
  backends (the first `jax.devices()`)."""
  check_target(target)
  for key, value in _ENV.items():
    os.environ.setdefault(key, value)
  flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in _XLA_FLAGS if f not in flags])


def devices(target: str, count: int = 1) -> list:
  """`count` devices of `target` (one host) to build a mesh over and compile for."""
  from jax.experimental import topologies
  check_target(target)
  if count < 1:
    raise ValueError(f"the target device count must be at least 1 (got {count})")
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                            topology=f"1x1x{count}")
  except (NotImplementedError, RuntimeError) as e:
    raise ValueError(
        f"compiling for {target} needs JAX's CUDA plugin: pip install "
        f"\"jax[cuda13]=={jax.__version__}\" (about 3.7 GB; no GPU needed). ({e})") from e
  return list(topology.devices)


def attention(compute, dtype, head_dims, capability: str = "9.0") -> str:
  """What `attention="auto"` resolves to on the target (compute capability `capability`), as
  `layers.Compute.kernel` chooses there: cuDNN where it takes every head dim, else the
  reference (one setting serves the whole model)."""
  if compute.attention != "auto":
    return compute.attention
  kernels = {compute.kernel(dtype, d, capability) for d in head_dims}
  return "cudnn" if kernels == {"cudnn"} else "reference"
