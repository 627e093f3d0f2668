"""The host input pipeline (grain): built datasets to batches of NumPy arrays.

Batch `step` of host `h` of `H` is a pure function of (seed, step): the examples are shuffled
per epoch from the seed, host h takes every H-th example of the global order, and the
augmentations draw from a generator seeded by (seed, example position). So the hosts' shards
of a step are disjoint and together make the global batch, and a run resumed at step s sees
exactly the batches it would have seen. `iterate` decodes and augments in worker processes.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import augment
from medvqa_jax.data.image import CLIP_MEAN, CLIP_STD


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


class _Example:
  """One example to arrays. A class (not a closure) so that worker processes can pickle it."""

  def __init__(self, kind, tokenizer, image_size, augmentation, answer_vocab=None,
               answer_tokenizer=None, mean=CLIP_MEAN, std=CLIP_STD):
    self.kind = kind
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.augmentation = augmentation
    self.label = {a: i for i, a in enumerate(answer_vocab)} if answer_vocab else None
    self.answer_tokenizer = answer_tokenizer
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def _pixels(self, image, rng):
    x = augment.AUGMENTATIONS[self.augmentation](np.asarray(image), self.image_size, rng)
    return (x.astype(np.float32) / 255.0 - self.mean) / self.std

  def __call__(self, ex, rng=None):
    rng = rng if rng is not None else np.random.default_rng(0)
    out = {"id": _text(ex["id"]), "images": self._pixels(ex["image"], rng)}
    text = _text(ex["question"] if self.kind == "vqa" else ex["caption"])
    tokens = self.tokenizer([text])
    out["input_ids"], out["attention_mask"] = tokens["input_ids"][0], tokens["attention_mask"][0]
    if self.kind == "vqa":
      refs = [_text(a) for a in ex["answers"]]
      out["answer"] = "#".join(refs)
      if self.label is not None:
        out["labels"] = np.int32(self.label.get(answers_lib.normalize(refs[0]), -1))
      if self.answer_tokenizer is not None:
        a = self.answer_tokenizer([answers_lib.normalize(refs[0])])
        out["answer_ids"], out["answer_mask"] = a["input_ids"][0], a["attention_mask"][0]
    else:
      second = ex["image2"] if "image2" in ex else ex["image"]  # Two views of one image.
      out["images2"] = self._pixels(second, rng)
    return out


def batches(source, *, kind: str, tokenizer, image_size: int, global_batch: int, seed: int,
            augmentation: str, process_index: int = 0, process_count: int = 1,
            shuffle: bool = True, repeat: bool = True, answer_vocab: Sequence[str] | None = None,
            answer_tokenizer=None) -> grain.MapDataset:
  """Per-host batches as a random-access grain dataset: `ds[step]` is this host's part of
  global batch `step`. kind: "vqa" or "caption"; augmentation: "finetune", "pretrain" or
  "test". With answer_vocab, VQA batches carry `labels` (-1: not in the vocabulary); with
  answer_tokenizer, `answer_ids`/`answer_mask` of the normalised answer."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
  if kind not in ("vqa", "caption"):
    raise ValueError(f"kind must be 'vqa' or 'caption', not {kind!r}")
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  if repeat:
    ds = ds.repeat()
  ds = ds[process_index::process_count]
  fn = _Example(kind, tokenizer, image_size, augmentation, answer_vocab, answer_tokenizer)
  ds = ds.random_map(fn) if augmentation != "test" else ds.map(fn)
  return ds.batch(global_batch // process_count, drop_remainder=repeat)


def iterate(ds: grain.MapDataset, start_step: int = 0, num_workers: int = 0,
            prefetch: int = 2):
  """Iterates batches from `start_step`, decoding in `num_workers` processes (0: here)."""
  it = ds[start_step:].to_iter_dataset(grain.ReadOptions(prefetch_buffer_size=prefetch))
  if num_workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run()
      flags.FLAGS.mark_as_parsed()   # they are the defaults.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
