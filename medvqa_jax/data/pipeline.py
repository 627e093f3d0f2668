"""The host input pipeline (grain): built datasets to batches of NumPy arrays.

Batch `step` of host `h` of `H` is a pure function of (seed, step): the examples are shuffled
per epoch from the seed, global batch b is positions b*G .. b*G+G-1 of that order, host h
takes the h-th contiguous block of it, and the augmentations draw from a generator seeded by
(seed, global position). So the hosts' shards of a step are disjoint and, concatenated in
host order, are the global batch a single host would have had; and a run resumed at step s
sees exactly the batches it would have seen. `iterate` decodes and augments in worker processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import zlib
from typing import Sequence

import grain
import numpy as np

from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import augment
from medvqa_jax.data import text as text_lib


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


class _Example:
  """One example to arrays. A class (not a closure) so that worker processes can pickle it."""

  def __init__(self, kind, tokenizer, image_size, augmentation, answer_vocab=None,
               answer_tokenizer=None, teacher=None):
    self.kind = kind
    self.teacher = teacher  # (tokenizer, image size) of an online teacher
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.augmentation = augmentation
    self.label = {a: i for i, a in enumerate(answer_vocab)} if answer_vocab else None
    self.answer_tokenizer = answer_tokenizer

  def _view(self, out, image, rng, suffix=""):
    # uint8: the image tower normalises on device (a quarter of the bytes to batch and copy);
    # a drawn blur travels as its sigma and is applied on device too (`device_augment`).
    pixels, blur = augment.AUGMENTATIONS[self.augmentation](image, self.image_size, rng)
    out["images" + suffix] = pixels
    if blur is not None:
      out["blur" + suffix] = np.float32(blur)

  def __call__(self, ex, rng=None):
    rng = rng if rng is not None else np.random.default_rng(0)
    out = {"id": _text(ex["id"])}
    first = augment.image(ex["image"])  # Decoded once: both views and the teacher's share it.
    self._view(out, first, rng)
    text = (text_lib.question(_text(ex["question"])) if self.kind == "vqa"
            else text_lib.caption(_text(ex["caption"])))
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
      if "image_id" in ex:  # The ITM negatives leave out other captions of the same picture.
        out["image_key"] = np.uint32(zlib.crc32(_text(ex["image_id"]).encode()))
      # Two views of one image (of two, in a multi-view corpus).
      second = augment.image(ex["image2"]) if "image2" in ex else first
      self._view(out, second, rng, suffix="2")
      if self.teacher is not None:
        # The teacher sees the un-augmented image resized to its own size and the cleaned
        # caption, as in launch/cache_teacher.py (`teacher.compute_cache`).
        tok, size = self.teacher
        raw = lambda x: augment.resize(x, size)
        t = tok([text])
        out.update(teacher_pixels=raw(first), teacher_input_ids=t["input_ids"][0],
                   teacher_attention_mask=t["attention_mask"][0])
        if "image2" in ex:
          out["teacher_pixels2"] = raw(second)
    return out


def batches(source, *, kind: str, tokenizer, image_size: int, global_batch: int, seed: int,
            augmentation: str, process_index: int = 0, process_count: int = 1,
            shuffle: bool = True, repeat: bool = True, answer_vocab: Sequence[str] | None = None,
            answer_tokenizer=None, teacher=None) -> grain.MapDataset:
  """Per-host batches as a random-access grain dataset: `ds[step]` is this host's part of
  global batch `step`. kind: "vqa" or "caption"; augmentation: "finetune", "pretrain" or
  "test" ("pretrain" adds each view's blur sigma, `blur`/`blur2`, for the device). With
  answer_vocab, VQA batches carry `labels` (-1: not in the vocabulary); with
  answer_tokenizer, `answer_ids`/`answer_mask` of the normalised answer. With teacher
  (tokenizer, image size), caption batches carry the online teacher's inputs."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
  if kind not in ("vqa", "caption"):
    raise ValueError(f"kind must be 'vqa' or 'caption', not {kind!r}")
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  if repeat:
    ds = ds.repeat()
  fn = _Example(kind, tokenizer, image_size, augmentation, answer_vocab, answer_tokenizer,
                teacher)
  # Mapped before the host split, so that an example's augmentation is seeded by its global
  # position (grain evaluates lazily: a host decodes only its own rows).
  ds = ds.random_map(fn) if augmentation != "test" else ds.map(fn)
  per_host = global_batch // process_count
  if process_count > 1 and not repeat and len(source) % global_batch:
    # A last partial global batch has no host split that every host can batch alike.
    raise ValueError(f"{len(source)} examples are not whole batches of {global_batch}: on "
                     f"{process_count} hosts a single pass reads whole global batches only")
  if process_count > 1:
    ds = grain.MapDataset.source(_HostRows(ds, global_batch, process_index, process_count))
  return ds.batch(per_host, drop_remainder=repeat)


class _HostRows:
  """Host h's rows of each global batch: global batch b is positions b*G .. b*G+G-1 and
  host h holds the contiguous block h*G/H .. (h+1)*G/H - 1 of it, the rows that
  `sharding.shard_batch` places on its devices. So the global batch, and its order, do not
  depend on the number of hosts."""

  def __init__(self, parent, global_batch: int, process_index: int, process_count: int):
    self.parent, self.global_batch = parent, global_batch
    self.per, self.index = global_batch // process_count, process_index

  def __len__(self):
    return len(self.parent) // self.global_batch * self.per

  def __getitem__(self, i):
    b, j = divmod(int(i), self.per)
    return self.parent[b * self.global_batch + self.index * self.per + j]


_PARENT_POLL_S = 1.0


def _worker_start(worker_index: int, worker_count: int):
  """In each input worker: SIGTERM and SIGINT are the main process's to handle. A scheduler
  signals every process of a job (Slurm's --signal, `kill -TERM -PGID`), Ctrl-C the terminal's
  whole process group; a worker that died of it failed the main process's next batch before
  it could save the step it reached. The main process stops the workers when it leaves
  `iterate`; a main process that ends without leaving it (killed: SIGKILL, the out-of-memory
  killer, a crash) cannot, so the worker ends itself once its parent is gone (it was left
  running, deaf to SIGTERM, holding its shared memory and the job's output pipe)."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:  # Re-parented (to init or a subreaper) once it is gone.
      time.sleep(_PARENT_POLL_S)
    os._exit(1)
  threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextlib.contextmanager
def iterate(ds: grain.MapDataset, start_step: int = 0, num_workers: int = 0,
            prefetch: int = 2):
  """`with iterate(ds) as it:` iterates batches from `start_step`, decoding in `num_workers`
  processes (0: here).

  An element of `ds` is a whole batch, made by one thread: each process (this one or each
  worker) makes `prefetch` batches at a time, in as many threads. Leaving the block stops the
  threads and worker processes and frees the batches in flight (shared memory), which an
  abandoned iterator would hold until the interpreter exits."""
  it = ds[start_step:].to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if num_workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run()
      flags.FLAGS.mark_as_parsed()   # they are the defaults.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=_worker_start)
  it = iter(it)
  try:
    yield it
  finally:
    it.close()
