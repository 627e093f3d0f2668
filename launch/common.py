"""Shared start-up for the launch scripts: make `configs` importable, quiet logs."""

import logging
import os
import sys
from pathlib import Path

# On GPUs, lower the threefry PRNG to a kernel rather than unrolled HLO: the same random
# numbers, but initialising a paper-size model compiles in seconds instead of minutes (an
# H200 took 3m41s to compile the initialiser without it).
os.environ.setdefault("JAX_THREEFRY_GPU_KERNEL_LOWERING", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# JAX logs at INFO each accelerator plugin it does not find (e.g. no TPU on a GPU machine).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# absl logs INFO lines by default (every TFDS file read, every Orbax save); show warnings
# and errors unless --verbosity asks for more.
from absl import app as _app  # noqa: E402
from absl import logging as _absl_logging  # noqa: E402


def _quiet():
  if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
    _absl_logging.set_verbosity(_absl_logging.WARNING)


_app.call_after_init(_quiet)
