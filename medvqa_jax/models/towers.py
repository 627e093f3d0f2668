"""Image and text towers from local checkpoints or from scratch.

    image, image_params = towers.load("image", "hf_clip", "/ckpt/clip-vit-base-patch16",
                                      image_size=288, depth=11)
    text, text_params = towers.load("text", "hf_bert", "/ckpt/Bio_ClinicalBERT")
    out = image.apply({"params": image_params}, images)   # out["tokens"], out["pooled"], ...

`from_config` does the same from a tower ConfigDict (see configs/towers/).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvqa_jax.models import importers, state_dict
from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.vit import VisionTransformer

log = logging.getLogger(__name__)

KINDS = {"vit": VisionTransformer, "clip_text": ClipTextTransformer, "bert": BertEncoder}
PART = {VisionTransformer: "image", ClipTextTransformer: "text", BertEncoder: "text"}
SOURCES = ("init",) + tuple(importers.SPECS)


def dummy_inputs(module: nn.Module) -> tuple:
  if isinstance(module, VisionTransformer):
    return (jnp.zeros((1, module.image_size, module.image_size, 3), jnp.float32),)
  ids = jnp.zeros((1, 8), jnp.int32)
  if isinstance(module, BertEncoder) and module.cross_from is not None:  # A decoder.
    return ids, None, None, jnp.zeros((1, 4, module.context_width or module.width), jnp.float32)
  return (ids,)


def init_params(module: nn.Module, rng: jax.Array):
  # Jitted: one program, where eager initialisation compiled one per operation (hundreds).
  return jax.jit(lambda rng: module.init(rng, *dummy_inputs(module))["params"])(rng)


def param_shapes(module: nn.Module):
  return jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))


def dtype_of(name: str | Any):
  return jnp.dtype(name) if isinstance(name, str) else name


def load(part: str, source: str, checkpoint: str | Path, *, dtype=jnp.float32,
         fresh: Sequence[str] = (), unused: Sequence[str] = (), seed: int = 0, **overrides):
  """Loads the `part` ("image" or "text") tower of a local checkpoint, strictly.

  source: "hf_clip", "hf_bert" or "open_clip" (see medvqa_jax.models.importers).
  overrides: module fields that differ from the checkpoint, e.g. depth=11 (keep the first 11
    blocks) or image_size=288 (position embeddings are resized bicubically).
  fresh: regexes over parameter paths ("head/.*") initialised from `seed` instead of loaded.
  unused: regexes over checkpoint keys that may be left unloaded.
  Returns (module, params); params are float32 NumPy arrays, `dtype` is the compute dtype.
  """
  if source not in importers.SPECS:
    raise ValueError(f"unknown checkpoint source {source!r}; expected one of "
                     f"{sorted(importers.SPECS)}")
  folder = Path(checkpoint)
  weights = state_dict.find_weights(folder, source)
  if folder.is_file():
    folder = folder.parent
  state = importers.canonical_keys(
      source, folder, state_dict.rename_legacy_keys(state_dict.read_state_dict(weights)))
  overrides = {k: v for k, v in overrides.items() if v is not None}
  spec = importers.SPECS[source](folder, part, state, overrides)
  module = spec.module(**spec.kwargs, dtype=dtype_of(dtype))
  namespaces = importers.NAMESPACES[source]
  stray = [k for k in state if not k.startswith(namespaces)
           and not any(re.fullmatch(p, k) for p in unused)]
  if stray:
    raise state_dict.CheckpointError(
        f"checkpoint {weights} does not match the {source} format; unexpected keys: "
        f"{sorted(stray)[:40]}")
  params = state_dict.assemble(
      state, spec.mapping, param_shapes(module), source=str(weights), owned=spec.owned,
      unused=spec.unused + tuple(unused), fresh=tuple(fresh) + spec.fresh,
      init=lambda: init_params(module, jax.random.PRNGKey(seed)))
  log.info("loaded the %s tower of %s (%s)", part, weights, type(module).__name__)
  return module, params


def from_config(cfg, seed: int = 0, abstract: bool = False, compute=None,
                where: str = "<tower>"):
  """(module, params) for a tower config: `kind`, `source`, `checkpoint`, `arch`, `dtype`,
  `fresh`, `unused`. With source "init" the tower is randomly initialised from `arch` alone
  (with `abstract`, not at all: params is None). `compute`: a layers.Compute for the module (how
  it computes; the parameters do not depend on it). `where`: the config's path to `cfg`
  (e.g. "model.image"), for the flags that errors name."""
  if cfg.kind not in KINDS:
    raise ValueError(f"unknown tower kind {cfg.kind!r}; expected one of {sorted(KINDS)}")
  if cfg.source not in SOURCES:
    raise ValueError(f"--config.{where}.source={cfg.source!r}: unknown; expected one of "
                     f"{', '.join(SOURCES)} (init: random weights, from `arch`)")
  arch = {k: v for k, v in cfg.arch.items() if v is not None}
  if compute is not None:
    arch["compute"] = compute
  if cfg.source == "init":
    module = KINDS[cfg.kind](**arch, dtype=dtype_of(cfg.dtype))
    return module, None if abstract else init_params(module, jax.random.PRNGKey(seed))
  if not cfg.checkpoint:
    raise ValueError(f"the {cfg.kind} tower loads a {cfg.source} checkpoint but no folder is "
                     f"set: pass --config.{where}.checkpoint=/path/to/folder")
  part = PART[KINDS[cfg.kind]]
  try:
    module, params = load(part, cfg.source, cfg.checkpoint, dtype=cfg.dtype,
                          fresh=tuple(cfg.get("fresh", ())), unused=tuple(cfg.get("unused", ())),
                          seed=seed, **arch)
  except FileNotFoundError as e:  # Named by the flag that sets the folder.
    raise FileNotFoundError(f"--config.{where}.checkpoint={cfg.checkpoint}: {e}") from None
  if not isinstance(module, KINDS[cfg.kind]):
    raise ValueError(f"the {part} tower of a {cfg.source} checkpoint is a "
                     f"{type(module).__name__}, but the config says kind={cfg.kind!r}")
  return module, params
