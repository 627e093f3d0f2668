r"""Prints the parameter count of a config's model, by component, as one JSON line.

  python launch/count_params.py --config=configs/base.py:image=paper_init,text=paper_init
  python launch/count_params.py --config=configs/demo.py

Only shapes are computed (no weights are initialised); towers loaded from checkpoints are
read to learn their shapes. `unused` names the parameters counted that no output depends on
(the towers' own projection heads: `amif.unused_params`).
"""

import json

import common  # Puts the repository root on sys.path.

_CONFIG = common.config_file_flag("configs/demo.py", "Config file.")


def main(argv):
  del argv
  from medvqa_jax.models import amif
  config = _CONFIG.value
  _, shapes = amif.create(config, abstract=True)
  by_component = {name: amif.param_count(tree) for name, tree in sorted(shapes.items())}
  print(json.dumps({"head": config.model.head, "total": sum(by_component.values()),
                    "by_component": by_component, "unused": amif.unused_params(shapes)}))


if __name__ == "__main__":
  common.run(main)
