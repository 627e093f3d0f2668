"""medvqa-jax: AMiF medical visual question answering in JAX/Flax.

Importing the package is cheap and never imports torch (torch is only a test reference).
"""

from pathlib import Path

__version__ = "0.1.0"

# Files shipped with the package: a BERT vocabulary and a few VQA-RAD samples (CC0) for the
# demo that runs with no download.
ASSETS = Path(__file__).parent / "assets"
