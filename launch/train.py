"""Training entry point: `python launch/train.py --config=configs/<dataset>.py`.

Training is not available yet: the towers and their checkpoint import are in place, the
fusion model, losses, data pipeline and train loop are still to come. Until then this
command says so and exits cleanly; `launch/embed.py` runs the towers end to end.
"""

import common  # noqa: F401  (puts the repository root on sys.path)
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")


def main(argv):
  del argv
  _ = _CONFIG.value  # The config is still parsed, so a wrong path or override is reported.
  print("Training is not available yet in this version of medvqa-jax: the image and text "
        "towers and their checkpoint import are ready (try `python launch/embed.py "
        "--config=configs/demo.py`); fusion, losses, data and the train loop come next.")


if __name__ == "__main__":
  app.run(main)
