"""Shared shape of a tower config; each preset in this folder fills one in.

Fields of a tower config:
  kind:       "vit", "clip_text" or "bert" (the module).
  source:     "init" (random, from `arch` alone), "hf_clip", "hf_bert" or "open_clip".
  checkpoint: local folder of the checkpoint (no downloads); set it on the command line,
              e.g. --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16.
  arch:       module fields; for a checkpoint, only those that differ from it
              (depth: keep the first N blocks; image_size: position embeddings are resized).
  dtype:      compute dtype ("float32" or "bfloat16"); parameters stay float32.
  fresh:      regexes of parameter paths to initialise instead of load (e.g. "head/.*").
  unused:     regexes of checkpoint keys to leave unloaded (weights the tower has no place
              for, e.g. a task head; BERT's heads beside its `bert.` keys are left out anyway).
  tokenizer:  text towers: tokenizer folder (empty: the checkpoint folder).
  max_len:    text towers: tokens per text.
  positions:  text towers from a checkpoint: how many tokens the tower reads (its position
              table; a tower from scratch says so in `arch`), where the preset knows it.
              Information for the config files (pretrain_common sizes max_len by it): it
              changes no tower, and setting it on the command line changes nothing; the
              tower's own table is what a run checks max_len against.
"""

import ml_collections
from ml_collections import config_dict


def tower(kind: str, source: str, arch: dict, checkpoint: str | None = None,
          positions: int | None = None, **extra) -> ml_collections.ConfigDict:
  cfg = dict(kind=kind, source=source,
             checkpoint=checkpoint if checkpoint else config_dict.placeholder(str),
             arch=arch, dtype="float32", fresh=(), unused=())
  if kind != "vit":
    cfg.update(tokenizer=config_dict.placeholder(str), max_len=30,
               positions=positions if positions else config_dict.placeholder(int))
  cfg.update(extra)
  return ml_collections.ConfigDict(cfg)


def text_positions(text) -> int | None:
  """How many tokens a text tower config's tower reads: its arch's (max_positions of a BERT,
  context_length of a CLIP text transformer) or its preset's `positions`; None if unknown."""
  return (text.arch.get("max_positions") or text.arch.get("context_length")
          or text.get("positions"))


def unset(type_=int):
  """An optional field (None) that the command line can still set to a `type_` value."""
  return config_dict.placeholder(type_)


def bf16(config):
  """bf16 compute for the towers and everything above them; parameters stay float32 and the
  losses (Sinkhorn included) compute in float32."""
  for part in (config.model.image, config.model.text):
    part.dtype = "bfloat16"
  config.model.dtype = "bfloat16"
  return config
