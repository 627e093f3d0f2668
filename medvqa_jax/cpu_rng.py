"""Threefry, JAX's default random-number hash, compiled as straight-line code on the CPU too.

JAX lowers each threefry call to a loop over its rounds on the CPU (unrolled on GPUs).
Initialising a model hashes a key and values for every parameter: hundreds of such loops,
each a region XLA's CPU backend compiles on its own. Unrolled, the tiny test model's
initialisation compiles in less than half the time (the 2-core development CPU, jax 0.10.2,
2026-12-07: 11.6 s -> 4.8 s with the test suite's XLA flags, 26.4 s -> 18.2 s with XLA's
defaults), and `tests/models/test_amif.py` ran in 362 s, not 407 s. The rounds are the same,
so are the bits drawn (tests/models/test_cpu_rng.py holds them to a NumPy Threefry-2x32).

Installed when `medvqa_jax.models` is imported (every command, and all of the model's code,
imports it): JAX's own unrolled lowering of the threefry primitive is registered for the CPU
platform. A JAX without the private names this reaches is left as it is.
"""

from __future__ import annotations


def install() -> bool:
  """Registers JAX's unrolled threefry lowering for the CPU; whether it could."""
  try:
    from jax._src.interpreters import mlir
    try:
      from jax._src.random import threefry2x32 as threefry
    except ImportError:  # Older JAX: in jax._src.prng.
      from jax._src import prng as threefry
    primitive, rule = threefry.threefry2x32_p, threefry._threefry2x32_lowering_rule
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(primitive, rule, platform="cpu")
  return True
