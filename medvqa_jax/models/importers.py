"""Checkpoint formats: how each one's keys map onto our towers' parameters.

  hf_clip:   a Hugging Face `CLIPModel` folder (OpenAI CLIP, PubMedCLIP): `config.json` +
             `model.safetensors` or `pytorch_model.bin`.
  hf_bert:   a Hugging Face BERT folder (Bio_ClinicalBERT, PubMedBERT/BiomedBERT, MiniLM),
             a bare `BertModel` or a pre-training checkpoint with a `bert.` prefix.
  open_clip: an open_clip checkpoint of BiomedCLIP's architecture: `open_clip_config.json` +
             `open_clip_pytorch_model.bin` (or `open_clip_model.safetensors`); timm ViT trunk
             with fused qkv, Hugging Face BERT text tower, projection heads.

Each `*_spec` returns the module's constructor arguments read from the checkpoint, and the
key mapping that `state_dict.assemble` loads strictly.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medvqa_jax.models import vit
from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.state_dict import CheckpointError, Mapping, conv
from medvqa_jax.models.vit import VisionTransformer


@dataclasses.dataclass
class Spec:
  module: type
  kwargs: dict[str, Any]
  mapping: Mapping
  owned: Callable[[str], bool]
  unused: tuple[str, ...] = ()
  # Parameter paths of parts the caller asked for that the checkpoint does not have (the
  # decoder's cross-attention, a masked-LM head): initialised, and logged as such.
  fresh: tuple[str, ...] = ()


def _prefixed(*prefixes: str) -> Callable[[str], bool]:
  return lambda k: k.startswith(prefixes)


def _num_blocks(state, pattern: str) -> int:
  found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def _depth(requested: int | None, available: int, source: str) -> int:
  if requested is None:
    return available
  if not 0 < requested <= available:
    raise ValueError(f"depth={requested} requested but {source} has {available} blocks")
  return requested


def _stated_blocks(state, pattern: str, stated: int, folder: Path) -> int:
  """The block count a config states, checked against the weights: a checkpoint cut after
  its last complete block would otherwise load as a shallower tower, silently."""
  found = _num_blocks(state, pattern)
  if found != stated:
    raise CheckpointError(
        f"{folder / 'config.json'} states {stated} layers, but the weights hold {found}: the "
        "checkpoint is incomplete (a shard or layers left out) or not this config's")
  return stated


def _dropped_blocks(prefix: str, depth: int, available: int) -> tuple[str, ...]:
  """Regex of the keys of blocks depth..available-1: dropped on purpose when depth is reduced."""
  if depth >= available:
    return ()
  return (rf"{re.escape(prefix)}({'|'.join(map(str, range(depth, available)))})\..*",)


def _hf_config(folder: Path, cls_name: str):
  import transformers  # Configs only; no torch involved.
  if not (folder / "config.json").is_file():  # transformers would give its defaults.
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder / 'config.json'} not found: a Hugging Face checkpoint "
                            f"folder holds its config.json next to its weights (found: {found})")
  try:
    return getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True)
  except OSError as e:
    raise FileNotFoundError(f"cannot read {folder}/config.json as a {cls_name}: {e}") from None


def _model_type(folder: Path) -> str | None:
  """The model_type of a folder's config.json (None without one, or without the field)."""
  path = folder / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text()).get("model_type")
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _bert_config(folder: Path):
  """The folder's BertConfig. A config of another model type is refused: RoBERTa-family
  checkpoints have BERT's key names, so they would load without a complaint, but their
  positions start after the padding index and their outputs would be wrong."""
  model_type = _model_type(folder)
  if model_type not in (None, "bert"):
    raise ValueError(f"{folder / 'config.json'}: model_type {model_type!r} is not a BERT "
                     "model; BERT-family checkpoints (model_type 'bert': BERT, PubMedBERT, "
                     "Bio_ClinicalBERT, MiniLM) are supported")
  return _hf_config(folder, "BertConfig")


def _weight(state, key: str, folder: Path):
  """state[key], or an error naming the checkpoint and the key."""
  if key not in state:
    raise CheckpointError(f"checkpoint {folder} does not match the model; missing key {key}")
  return state[key]


# Module fields that change no weight's shape but what the tower computes: an override that
# contradicts what a checkpoint states of them would load cleanly and compute something else.
_UNSEEN = ("num_heads", "act", "ln_eps", "pre_norm")


def _with_overrides(kw: dict, overrides: dict, where: str, stated=_UNSEEN) -> dict:
  """kw (the module fields read from a checkpoint) updated with `overrides`, refusing those
  that contradict `stated` fields (shape fields are checked against the weights later)."""
  for name in stated:
    if name in overrides and name in kw and overrides[name] != kw[name]:
      raise CheckpointError(
          f"{where} states {name}={kw[name]!r}, but the tower's arch sets {name}="
          f"{overrides[name]!r}: the weights would load and compute something else. Drop "
          f"that override (a checkpoint's {', '.join(stated)} are taken from it)")
  return {**kw, **overrides}


# Widths whose models of the usual families split into heads of 64 (ViT-Ti/S/M/B/L; BERT-
# tiny/mini/small/medium/base/large). A checkpoint that states no head count is read with
# width // 64 heads only at these widths: the head count changes no weight's shape, so a
# wrong guess would load cleanly and compute something else (ViT-H: 16 heads of 80; MiniLM:
# 384 wide, 12 heads of 32).
_HEADS_OF_64 = {"image": (192, 384, 512, 768, 1024), "text": (128, 256, 512, 768, 1024)}


def _num_heads(overrides: dict, width: int, part: str, what: str) -> int:
  if overrides.get("num_heads") is not None:
    return overrides["num_heads"]
  if width not in _HEADS_OF_64[part]:
    raise ValueError(f"{what} does not state its number of attention heads, and at width "
                     f"{width} it cannot be assumed: set the tower config's arch.num_heads "
                     f"(--config.model.{part}.arch.num_heads=N, or teacher.{part} for the "
                     "teacher)")
  return width // 64


# ---- Hugging Face CLIPModel ---------------------------------------------------------------

def _clip_blocks(m: Mapping, prefix: str, depth: int, heads: int):
  for i in range(depth):
    p = f"{prefix}encoder.layers.{i}."
    m.layernorm(f"block_{i}/ln_1", p + "layer_norm1")
    m.attention(f"block_{i}/attn", p + "self_attn.q_proj", p + "self_attn.k_proj",
                p + "self_attn.v_proj", p + "self_attn.out_proj", heads)
    m.layernorm(f"block_{i}/ln_2", p + "layer_norm2")
    m.dense(f"block_{i}/mlp/fc1", p + "mlp.fc1")
    m.dense(f"block_{i}/mlp/fc2", p + "mlp.fc2")


# One tower of CLIP saved alone (CLIPVisionModel[WithProjection], CLIPTextModel[...]): its
# part, config class, key prefix in a CLIPModel and projection's keys. The ...WithProjection
# classes save the tower's keys as a CLIPModel does; the plain ones, in transformers 5,
# without the prefix, and have no projection.
_CLIP_ONE_TOWER = {"clip_vision_model": ("image", "CLIPVisionConfig", "vision_model.",
                                         "visual_projection."),
                   "clip_text_model": ("text", "CLIPTextConfig", "text_model.",
                                       "text_projection.")}


def canonical_keys(source: str, folder: Path, state: dict) -> dict:
  """A checkpoint's keys as its format's spec reads them: those of a CLIP tower saved alone
  without its CLIPModel prefix get it."""
  alone = _CLIP_ONE_TOWER.get(_model_type(folder)) if source == "hf_clip" else None
  if alone is None or any(k.startswith(alone[2]) for k in state):
    return state
  return {k if k.startswith(alone[3]) else alone[2] + k: v for k, v in state.items()}


def _check_pixel_normalisation(path: Path, mean, std) -> None:
  """Refuses an image tower trained on pixels normalised otherwise than `vit.normalize`
  (CLIP's mean and std), as its checkpoint's preprocessing config states (nothing to check
  where it states none): its features would be computed from other inputs, silently."""
  for name, got, want in (("mean", mean, vit.CLIP_MEAN), ("std", std, vit.CLIP_STD)):
    if got is None:
      continue
    values = np.asarray(got, np.float64).reshape(-1)
    if values.size == 1:
      values = np.repeat(values, 3)
    if values.shape != (3,) or np.abs(values - np.asarray(want)).max() > 1e-4:
      raise ValueError(
          f"{path}: the image tower was trained on pixels normalised with {name} {list(got)}, "
          f"but this code base normalises with CLIP's ({name} {list(want)}, "
          "models/vit.py normalize): its image features would be wrong")


def _clip_config(folder: Path, part: str, state):
  """(the part's config, projection width) of a CLIPModel folder or of one tower's folder
  (width None for a tower saved without its projection: CLIPVisionModel, CLIPTextModel).
  Another model type is refused (transformers would read it as a default CLIP config)."""
  model_type = _model_type(folder)
  if model_type in (None, "clip"):
    config = _hf_config(folder, "CLIPConfig")
    return getattr(config, f"{'vision' if part == 'image' else 'text'}_config"), \
        config.projection_dim
  alone = _CLIP_ONE_TOWER.get(model_type)
  if alone is None:
    raise ValueError(f"{folder / 'config.json'}: model_type {model_type!r} is not a CLIP "
                     "model (a CLIPModel, 'clip', or one tower: 'clip_vision_model', "
                     "'clip_text_model')")
  if alone[0] != part:
    raise ValueError(f"{folder} holds CLIP's {alone[0]} tower alone ({model_type}), not an "
                     f"{part} tower")
  config = _hf_config(folder, alone[1])
  projected = any(k.startswith(alone[3]) for k in state)
  return config, config.projection_dim if projected else None


def hf_clip_spec(folder: Path, part: str, state, overrides: dict) -> Spec:
  if part not in ("image", "text"):
    raise ValueError(f"a CLIPModel has an 'image' and a 'text' part, not {part!r}")
  c, projection_dim = _clip_config(folder, part, state)
  m = Mapping()
  where = f"{folder / 'config.json'}"
  if part == "image":
    pre = "vision_model."
    available = _stated_blocks(state, rf"{re.escape(pre)}encoder\.layers\.(\d+)\.",
                               c.num_hidden_layers, folder)
    depth = _depth(overrides.get("depth"), available, str(folder))
    kw = dict(image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
              depth=depth, num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
              pre_norm=True, act=c.hidden_act, ln_eps=c.layer_norm_eps, patch_bias=False,
              proj_dim=projection_dim, proj_kind="linear", proj_bias=False)
    kw = _with_overrides(kw, overrides, where)
    # An image processor saved alone writes preprocessor_config.json; a whole CLIPProcessor
    # (transformers 5) writes processor_config.json, the image processor's settings in it.
    for name, key in (("preprocessor_config.json", None), ("processor_config.json",
                                                            "image_processor")):
      if (folder / name).exists():
        p = json.loads((folder / name).read_text())
        p = (p.get(key) or {}) if key else p
        _check_pixel_normalisation(folder / name, p.get("image_mean"), p.get("image_std"))
    grid = kw["image_size"] // kw["patch_size"]
    m.add("patch_embed/kernel", pre + "embeddings.patch_embedding.weight", conv)
    m.add("cls_token", pre + "embeddings.class_embedding")
    m.add("pos_embed", pre + "embeddings.position_embedding.weight",
          lambda w: vit.resize_pos_embed(w, grid))
    m.layernorm("ln_pre", pre + "pre_layrnorm")
    _clip_blocks(m, pre, depth, kw["num_heads"])
    m.layernorm("ln_final", pre + "post_layernorm")
    if projection_dim is not None:
      m.dense("head/proj", "visual_projection", bias=False)
    return Spec(VisionTransformer, kw, m, _prefixed(pre, "visual_projection."),
                (rf"{re.escape(pre)}embeddings\.position_ids",)
                + _dropped_blocks(pre + "encoder.layers.", depth, available))
  if part == "text":
    pre = "text_model."
    available = _stated_blocks(state, rf"{re.escape(pre)}encoder\.layers\.(\d+)\.",
                               c.num_hidden_layers, folder)
    depth = _depth(overrides.get("depth"), available, str(folder))
    # eos_token_id 2 is the legacy value of old configs; their end-of-text is the largest id.
    eos = None if c.eos_token_id in (None, 2) else c.eos_token_id
    kw = dict(vocab_size=c.vocab_size, context_length=c.max_position_embeddings,
              width=c.hidden_size, depth=depth, num_heads=c.num_attention_heads,
              mlp_dim=c.intermediate_size, act=c.hidden_act, ln_eps=c.layer_norm_eps,
              eos_token_id=eos, proj_dim=projection_dim)
    kw = _with_overrides(kw, overrides, where)
    m.add("token_embed/embedding", pre + "embeddings.token_embedding.weight")
    m.add("pos_embed", pre + "embeddings.position_embedding.weight",
          lambda w: w[:kw["context_length"]])
    _clip_blocks(m, pre, depth, kw["num_heads"])
    m.layernorm("ln_final", pre + "final_layer_norm")
    if projection_dim is not None:
      m.dense("head/proj", "text_projection", bias=False)
    return Spec(ClipTextTransformer, kw, m, _prefixed(pre, "text_projection."),
                (rf"{re.escape(pre)}embeddings\.position_ids",)
                + _dropped_blocks(pre + "encoder.layers.", depth, available))


# ---- BERT -------------------------------------------------------------------------------

def bert_mapping(prefix: str, depth: int, heads: int, pooler: str, cross_from: int | None = None,
                 lm_head: bool = False) -> Mapping:
  m = Mapping()
  e = prefix + "embeddings."
  m.add("word_embed/embedding", e + "word_embeddings.weight")
  m.add("pos_embed/embedding", e + "position_embeddings.weight")
  m.add("type_embed/embedding", e + "token_type_embeddings.weight")
  m.layernorm("embed_ln", e + "LayerNorm")
  for i in range(depth):
    p = f"{prefix}encoder.layer.{i}."
    m.attention(f"layer_{i}/attn", p + "attention.self.query", p + "attention.self.key",
                p + "attention.self.value", p + "attention.output.dense", heads)
    m.layernorm(f"layer_{i}/attn_ln", p + "attention.output.LayerNorm")
    m.dense(f"layer_{i}/mlp/fc1", p + "intermediate.dense")
    m.dense(f"layer_{i}/mlp/fc2", p + "output.dense")
    m.layernorm(f"layer_{i}/mlp_ln", p + "output.LayerNorm")
    if cross_from is not None and i >= cross_from:
      c = p + "crossattention."
      m.attention(f"layer_{i}/cross_attn", c + "self.query", c + "self.key", c + "self.value",
                  c + "output.dense", heads)
      m.layernorm(f"layer_{i}/cross_ln", c + "output.LayerNorm")
  if pooler == "dense":
    m.dense("pooler", prefix + "pooler.dense")
  if lm_head:  # BertForPreTraining / BertForMaskedLM / BertLMHeadModel keep it under `cls.`.
    m.dense("lm_dense", "cls.predictions.transform.dense")
    m.layernorm("lm_ln", "cls.predictions.transform.LayerNorm")
    m.add("lm_bias", "cls.predictions.bias")
  return m


def missing_optional_parts(state, mapping: Mapping, kw: dict) -> tuple[str, ...]:
  """Regexes of the decoder parts (cross-attention, LM head) absent from the checkpoint."""
  groups = [r"layer_\d+/cross_.*"] if kw.get("cross_from") is not None else []
  if kw.get("lm_head"):
    groups.append(r"lm_.*")
  fresh = []
  for pattern in groups:
    keys = [k for path, e in mapping.entries.items() if re.fullmatch(pattern, path)
            for k in e.keys]
    if keys and not any(k in state for k in keys):
      fresh.append(pattern)
  return tuple(fresh)


def bert_unused(prefix: str, depth: int, available: int, pooler: str) -> tuple[str, ...]:
  unused = [rf"{re.escape(prefix)}embeddings\.position_ids",
            *_dropped_blocks(prefix + "encoder.layer.", depth, available)]
  if pooler != "dense":
    unused.append(rf"{re.escape(prefix)}pooler\.dense\..*")
  return tuple(unused)


def _bert_kwargs_from_state(state, prefix: str, folder: Path, overrides: dict,
                            what: str) -> dict:
  """BERT dimensions read off the weights, for checkpoints that ship no BertConfig."""
  e = prefix + "embeddings."
  get = lambda key: _weight(state, key, folder)
  vocab, width = get(e + "word_embeddings.weight").shape
  return dict(vocab_size=vocab, width=width,
              max_positions=get(e + "position_embeddings.weight").shape[0],
              type_vocab_size=get(e + "token_type_embeddings.weight").shape[0],
              depth=_num_blocks(state, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\."),
              num_heads=_num_heads(overrides, width, "text", what),
              mlp_dim=get(f"{prefix}encoder.layer.0.intermediate.dense.weight").shape[0],
              act="gelu", ln_eps=1e-12)


def _bert_kwargs_from_config(c) -> dict:
  return dict(vocab_size=c.vocab_size, max_positions=c.max_position_embeddings,
              type_vocab_size=c.type_vocab_size, width=c.hidden_size,
              depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
              mlp_dim=c.intermediate_size, act=c.hidden_act, ln_eps=c.layer_norm_eps)


def hf_bert_spec(folder: Path, part: str, state, overrides: dict) -> Spec:
  if part != "text":
    raise ValueError(f"a BERT checkpoint has only a 'text' part, not {part!r}")
  prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
  kw = _bert_kwargs_from_config(_bert_config(folder))
  available = kw["depth"]
  kw["depth"] = _depth(overrides.get("depth"), available, str(folder))
  kw["pooler"] = "dense"
  kw = _with_overrides(kw, overrides, f"{folder / 'config.json'}")
  m = bert_mapping(prefix, kw["depth"], kw["num_heads"], kw["pooler"], kw.get("cross_from"),
                   kw.get("lm_head", False))
  if kw.get("lm_head"):
    _check_tied_lm_head(state, prefix, folder)
  # Checkpoints of a BERT with a head keep the BERT under `bert.` and the head beside it:
  # pre-training heads under `cls.` (BertForPreTraining / MaskedLM, whose LM head the
  # decoder takes), task heads (`classifier.`, `qa_outputs.`, ...), not loaded.
  heads = (r"(?!bert\.).*",) if prefix else (r"cls\..*",)
  unused = bert_unused(prefix, kw["depth"], available, kw["pooler"]) + heads
  return Spec(BertEncoder, kw, m, lambda k: True, unused, missing_optional_parts(state, m, kw))


def _check_tied_lm_head(state, prefix: str, folder: Path) -> None:
  """The decoder's LM head multiplies by the word embeddings (BERT ties them): a checkpoint
  whose LM output matrix (or its bias) is its own would load with other logits, silently."""
  pairs = (("cls.predictions.decoder.weight", prefix + "embeddings.word_embeddings.weight"),
           ("cls.predictions.decoder.bias", "cls.predictions.bias"))
  for own, tied in pairs:
    if own in state and tied in state and not (
        np.shape(state[own]) == np.shape(state[tied])
        and np.array_equal(np.asarray(state[own]), np.asarray(state[tied]))):
      raise CheckpointError(
          f"checkpoint {folder}: its LM head's {own} is not {tied} (an untied LM head), but "
          "the decoder's LM head is tied to the word embeddings, as BERT's is: it would give "
          "other logits. Use a checkpoint whose LM head is tied to its word embeddings")


# ---- open_clip (BiomedCLIP architecture) ------------------------------------------------

def _open_clip_file(folder: Path) -> dict:
  path = folder / "open_clip_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: an open_clip checkpoint folder holds "
                            "open_clip_config.json next to its weights")
  return json.loads(path.read_text())


# The depth of timm's ViTs by size name (vit_base_patch16_224: BiomedCLIP's trunk), to check a
# checkpoint against the trunk its config names; other trunks are taken as their weights hold.
_TIMM_VIT_DEPTH = {"tiny": 12, "small": 12, "medium": 12, "base": 12, "large": 24, "huge": 32,
                   "giant": 40}


def open_clip_spec(folder: Path, part: str, state, overrides: dict) -> Spec:
  whole = _open_clip_file(folder)
  cfg = whole.get("model_cfg", whole)
  embed_dim = cfg["embed_dim"]
  if part == "image":
    vc = cfg["vision_cfg"]
    pre_cfg = whole.get("preprocess_cfg") or {}
    _check_pixel_normalisation(folder / "open_clip_config.json", pre_cfg.get("mean"),
                               pre_cfg.get("std"))
    if "timm_model_name" not in vc:
      raise ValueError(f"{folder}: only timm image trunks (BiomedCLIP's) are supported, "
                       f"got vision_cfg {vc}")
    # Absent keys mean open_clip's defaults: timm_pool "avg" (mean of the patch tokens),
    # which this tower does not compute.
    if vc.get("timm_pool", "avg") not in ("", "token") or vc.get("timm_proj", "linear") != "linear":
      raise ValueError(f"{folder}: expected timm_pool '' (or 'token') and timm_proj 'linear' "
                       f"(open_clip's defaults: 'avg', 'linear'), got {vc}")
    pre = "visual.trunk."
    get = lambda key: _weight(state, key, folder)
    width = get(pre + "cls_token").shape[-1]
    patch = get(pre + "patch_embed.proj.weight").shape[-1]
    available = _num_blocks(state, rf"{re.escape(pre)}blocks\.(\d+)\.")
    size_name = re.match(r"vit_(tiny|small|medium|base|large|huge|giant)_", vc["timm_model_name"])
    if size_name and available != _TIMM_VIT_DEPTH[size_name.group(1)]:
      raise CheckpointError(
          f"{folder}: the timm trunk {vc['timm_model_name']!r} has "
          f"{_TIMM_VIT_DEPTH[size_name.group(1)]} blocks, but the weights hold {available}: "
          "the checkpoint is incomplete or not this config's")
    depth = _depth(overrides.get("depth"), available, str(folder))
    heads = _num_heads(overrides, width, "image",
                       f"{folder}: the timm trunk {vc['timm_model_name']!r}")
    size = vc.get("image_size", 224)
    if isinstance(size, (list, tuple)):  # open_clip also takes [height, width].
      if len(set(size)) != 1:
        raise ValueError(f"{folder}: vision_cfg.image_size {size}: only square images are "
                         "supported")
      size = size[0]
    kw = dict(vit.STYLES["timm"], image_size=int(size), patch_size=patch,
              width=width, depth=depth, num_heads=heads,
              mlp_dim=get(pre + "blocks.0.mlp.fc1.weight").shape[0],
              proj_dim=embed_dim, proj_kind="linear",
              proj_bias=("visual.head.proj.bias" in state))
    kw = _with_overrides(kw, overrides, f"{folder}'s timm trunk",
                         stated=tuple(vit.STYLES["timm"]))
    grid = kw["image_size"] // kw["patch_size"]
    m = Mapping()
    m.add("patch_embed/kernel", pre + "patch_embed.proj.weight", conv)
    m.add("patch_embed/bias", pre + "patch_embed.proj.bias")
    m.add("cls_token", pre + "cls_token", lambda w: w.reshape(-1))
    # Resized as timm resizes a trunk's (resample_abs_pos_embed's default: antialiased).
    m.add("pos_embed", pre + "pos_embed",
          lambda w: vit.resize_pos_embed(w[0], grid, antialias=True))
    for i in range(depth):
      p = f"{pre}blocks.{i}."
      m.layernorm(f"block_{i}/ln_1", p + "norm1")
      m.fused_attention(f"block_{i}/attn", p + "attn.qkv", p + "attn.proj", kw["num_heads"])
      m.layernorm(f"block_{i}/ln_2", p + "norm2")
      m.dense(f"block_{i}/mlp/fc1", p + "mlp.fc1")
      m.dense(f"block_{i}/mlp/fc2", p + "mlp.fc2")
    m.layernorm("ln_final", pre + "norm")
    m.dense("head/proj", "visual.head.proj", bias=kw["proj_bias"])
    return Spec(VisionTransformer, kw, m, _prefixed("visual."),
                _dropped_blocks(pre + "blocks.", depth, available))
  if part == "text":
    tc = cfg["text_cfg"]
    if not tc.get("hf_model_name"):
      raise ValueError(f"{folder}: only Hugging Face text towers (text_cfg.hf_model_name, "
                       f"BiomedCLIP's) are supported, got text_cfg {tc}")
    # Absent, open_clip's default is "mean_pooler", which this tower does not compute.
    if tc.get("hf_pooler_type", "mean_pooler") != "cls_last_hidden_state_pooler":
      raise ValueError(f"{folder}: only hf_pooler_type 'cls_last_hidden_state_pooler' is "
                       f"supported, got {tc.get('hf_pooler_type')} (open_clip's default: "
                       "'mean_pooler')")
    pre = "text.transformer."
    hf_dir = Path(tc["hf_model_name"])
    stated = _UNSEEN
    if (hf_dir / "config.json").exists():
      kw = _bert_kwargs_from_config(_bert_config(hf_dir))
    else:  # A hub name: the BERT shape is read off the weights (heads, GELU, eps assumed).
      kw = _bert_kwargs_from_state(
          state, pre, folder, overrides,
          f"{folder}: the text tower {tc['hf_model_name']!r} (no config.json there)")
      stated = ()
    available = kw["depth"]
    kw["depth"] = _depth(overrides.get("depth"), available, str(folder))
    proj_kind = tc.get("hf_proj_type", "mlp")
    if proj_kind not in ("mlp", "linear"):
      raise ValueError(f"{folder}: unsupported hf_proj_type {proj_kind!r}")
    kw.update(pooler="cls", proj_dim=embed_dim, proj_kind=proj_kind)
    kw = _with_overrides(kw, overrides, f"{hf_dir / 'config.json'}", stated)
    m = bert_mapping(pre, kw["depth"], kw["num_heads"], kw["pooler"], kw.get("cross_from"),
                     kw.get("lm_head", False))
    unused = bert_unused(pre, kw["depth"], available, kw["pooler"])
    if kw["pooler"] == "none":  # The trunk alone (the decoder): no pooled feature to project.
      unused += (r"text\.proj\..*",)
    elif proj_kind == "mlp":
      m.dense("head/fc1", "text.proj.0", bias=False)
      m.dense("head/fc2", "text.proj.2", bias=False)
    else:
      m.dense("head/proj", "text.proj", bias=False)
    return Spec(BertEncoder, kw, m, _prefixed("text."), unused,
                missing_optional_parts(state, m, kw))
  raise ValueError(f"an open_clip model has an 'image' and a 'text' part, not {part!r}")


SPECS = {"hf_clip": hf_clip_spec, "hf_bert": hf_bert_spec, "open_clip": open_clip_spec}
# What each format's keys may start with: its towers, and the logit scale they share. A key
# outside these is unexpected whichever tower is being loaded.
NAMESPACES = {
    "hf_clip": ("vision_model.", "visual_projection.", "text_model.", "text_projection.",
                "logit_scale"),
    "hf_bert": ("",),
    "open_clip": ("visual.", "text.", "logit_scale", "logit_bias"),
}
