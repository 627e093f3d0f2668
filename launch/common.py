"""Shared start-up for the launch scripts: make `configs` importable, quiet logs."""

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# JAX logs at INFO each accelerator plugin it does not find (e.g. no TPU on a GPU machine).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# absl logs INFO lines by default (every TFDS file read, every Orbax save); show warnings
# and errors unless --verbosity=0 asks for more.
from absl import flags as _flags  # noqa: E402
from absl import logging as _absl_logging  # noqa: E402,F401  (defines --verbosity)

_flags.FLAGS.set_default("verbosity", -1)
