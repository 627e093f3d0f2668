"""The teacher's embeddings of each pre-training batch, training's and validation's: looked
up in the cache (`teacher.mode=cache`) or computed on device by the frozen teacher
(`online`); none for `teacher.mode=none`."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from medvqa_jax.train import determinism

log = logging.getLogger(__name__)


def check_teacher_config(config) -> str:
  """The teacher mode of a pre-training config, refused (before any data is read) when it is
  unknown or names no cache file."""
  mode = config.teacher.mode
  if mode not in ("cache", "online", "none"):
    raise ValueError(f"teacher.mode must be cache, online or none, not {mode!r}")
  if mode == "cache" and not config.teacher.get("cache"):
    raise ValueError("teacher.mode is 'cache' but no cache file is set: build one with "
                     "`python launch/cache_teacher.py` and pass --config.teacher.cache=FILE "
                     "(or --config.teacher.mode=online)")
  return mode


def recorded_teacher(config, run: dict | None) -> str | None:
  """The fingerprint of the teacher a run's record names, if the config's teacher is still the
  run's (its fields the same, the cache file and the mode aside); else None."""
  if not run or not run.get("teacher") or not run.get("config"):
    return None
  def fields(teacher: dict) -> dict:
    return {k: v for k, v in teacher.items() if k not in ("cache", "mode")}
  then = json.loads(run["config"]).get("teacher") or {}
  return run["teacher"] if fields(then) == fields(json.loads(config.teacher.to_json())) else None


class BatchTeacher:
  """Teacher embeddings for pre-training batches (training's and validation's): looked up in
  the cache, or computed online on device by the frozen teacher.

  run: the record of the run being resumed or evaluated. Its cache is checked against the
  teacher the run recorded (when the config's teacher is still that one), so that its
  checkpoint need not be where the config says: a run folder and its cache evaluate or resume
  on another machine."""

  def __init__(self, config, splits: dict, mesh, run: dict | None = None):
    from medvqa_jax.losses import teacher as teacher_lib
    self.mode = check_teacher_config(config)
    self.cache = self.online = self.fingerprint = None
    if self.mode == "none":
      utgc = config.losses.weights.get("utgc", 0.0)
      if utgc:  # (It would train nothing, said nothing.)
        log.warning("teacher.mode is 'none': losses.weights.utgc=%s is not used (utgc has no "
                    "hard-label form: a caption's only positive is itself); itgc and imvc are "
                    "hard-label InfoNCE", utgc)
      return
    self.fingerprint = recorded_teacher(config, run) if self.mode == "cache" else None
    teacher = None if self.fingerprint else teacher_lib.from_config(config)
    self.fingerprint = self.fingerprint or teacher.fingerprint()
    if self.mode == "cache":
      self.cache = teacher_lib.TeacherCache.load(config.teacher.cache)
      # The cache is made for the whole training split, held-out validation slice included.
      records = [r for split in splits.values() for r in split.records]
      ids = [r["id"] for r in records]
      captions = [r["caption"] for r in records]
      multi_view = "image2_id" in records[0]
      self.cache.check(ids, captions, [r["image_id"] for r in records], self.fingerprint,
                       path=config.teacher.cache,
                       image2_ids=[r["image2_id"] for r in records] if multi_view else None,
                       whose=("the one this run was started with (its record)" if teacher is None
                              else "the configured one"))
    else:
      self.online = teacher
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self.params = jax.device_put((teacher.image_params, teacher.text_params), replicated)
      self.scale = jax.device_put(np.float32(teacher.logit_scale), replicated)
      self._embed = jax.jit(teacher.apply,
                            compiler_options=determinism.compiler_options(config, mesh))

  def pipeline_option(self):
    return (self.online.tokenizer, self.online.image_size) if self.online else None

  def host_fields(self, ids) -> dict:
    return self.cache.lookup(ids) if self.cache is not None else {}

  def device_fields(self, batch: dict) -> dict:
    if self.online is None:
      return batch
    batch = dict(batch)
    pixels, t_ids, t_mask = (batch.pop(k) for k in ("teacher_pixels", "teacher_input_ids",
                                                    "teacher_attention_mask"))
    batch["teacher_image"], batch["teacher_text"] = self._embed(self.params, pixels, t_ids,
                                                                t_mask)
    if "teacher_pixels2" in batch:
      batch["teacher_image2"] = self._embed(self.params, batch.pop("teacher_pixels2"), t_ids,
                                            t_mask)[0]
    batch["teacher_scale"] = self.scale
    return batch
