"""Compiling for a GPU that is not here (medvqa_jax/train/aot.py): what "auto" attention
becomes on the target, the compiler's settings, and what is said when JAX's CUDA plugin is
missing. The compilation itself needs the plugin (about 3.7 GB), which the test install does
not hold; BENCHMARKS.md records it against the H200's measured memory."""

import os
import re

import jax
import pytest

from medvqa_jax.models import layers
from medvqa_jax.train import aot


def test_auto_attention_resolves_as_on_a_hopper_gpu():
  auto = layers.Compute(attention="auto")
  assert aot.attention(auto, "bfloat16", [64]) == "cudnn"
  assert aot.attention(auto, "float16", [64, 128]) == "cudnn"
  assert aot.attention(auto, "float32", [64]) == "reference"  # cuDNN's kernel is 16-bit.
  assert aot.attention(auto, "bfloat16", [64, 36]) == "reference"  # 36: not a multiple of 8.
  assert aot.attention(auto, "bfloat16", [256]) == "cudnn"  # Hopper takes up to 256.
  assert aot.attention(auto, "bfloat16", [256], capability="8.0") == "reference"
  assert aot.attention(layers.Compute(attention="auto", pad_to=3), "bfloat16", [64]) == \
      "reference"  # Odd pads.
  assert aot.attention(layers.Compute(attention="xla"), "float32", [36]) == "xla"  # As asked.


def test_prepare_adds_the_compilers_flags_once(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
  monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
  aot.prepare("h100")
  aot.prepare("h200")
  assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d",
                                             "--xla_gpu_enable_triton_gemm=false"]
  assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
  with pytest.raises(ValueError, match="unknown target 'v5p'; expected one of \\['h100', "
                     "'h200'\\]"):
    aot.prepare("v5p")


def test_without_the_cuda_plugin_the_error_says_what_to_install(monkeypatch):
  from jax.experimental import topologies

  def missing(**kw):
    raise NotImplementedError("topology not implemented for cuda")
  monkeypatch.setattr(topologies, "get_topology_desc", missing)
  with pytest.raises(ValueError, match=f"compiling for h200 needs JAX's CUDA plugin: pip "
                     f"install \"jax\\[cuda13\\]=={jax.__version__}\""):
    aot.devices("h200")
  with pytest.raises(ValueError, match="at least 1"):
    aot.devices("h200", 0)


def test_targets_describe_the_chips():
  for name, memory_mib in (("h100", 81_559), ("h200", 143_771)):
    text = aot.TARGETS[name]
    assert f"device_memory_size: {memory_mib * 2 ** 20}" in text
    assert "core_count: 132" in text and "major: 9" in text
    # The chip's own fields (the cuDNN version has a "major: 9" of its own): compute
    # capability 9.0 (Hopper, sm_90), which decides what the compiler emits for it.
    info = text[text.index("gpu_device_info {"):text.index("\n}\n")]
    capability = re.search(r"cuda_compute_capability \{\s*major: (\d+)\s*(minor: (\d+))?",
                           info)
    assert capability and (capability[1], capability[3] or "0") == ("9", "0"), info
    fields = dict(re.findall(r"^  (\w+): (\S+)$", info, re.M))
    # NVIDIA's H100/H200 SXM datasheets and the CUDA guide's compute capability 9.0 limits:
    # 50 MB of L2, 228 KB of shared memory per SM of which 227 KB for one block (opt-in),
    # 4.8 TB/s of HBM3e bandwidth on the H200 (3.35 TB/s of HBM3 on the H100).
    assert int(fields["l2_cache_size"]) == 50 * 2 ** 20
    assert int(fields["shared_memory_per_core"]) == 228 * 1024
    assert int(fields["shared_memory_per_block_optin"]) == 227 * 1024
    bandwidth = {"h100": 3.35e12, "h200": 4.8e12}[name]
    assert int(fields["memory_bandwidth"]) == pytest.approx(bandwidth, rel=1e-3)
