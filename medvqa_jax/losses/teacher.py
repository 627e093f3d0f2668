"""The frozen soft-label teacher and its embedding cache.

The teacher (any CLIP-like image + text tower pair; BiomedCLIP by default) sees the
un-augmented image (as the built dataset stores it) resized to its own resolution and the
cleaned caption (`data.text.caption`, what the student reads), as the reference's teacher
does, so its embeddings are fixed per example: `launch/cache_teacher.py` computes them once
into a cache file keyed by example id, and training reads them from there. The cache records
a fingerprint of the teacher (its parameters, tokenizer and input sizes), of the dataset (ids
and captions) and each example's image id (the digest of its image as the dataset stores it,
`builders.image_digest`; and of its second image, of a multi-view corpus);
`TeacherCache.check` refuses a cache made by another teacher or for other data.
`Teacher.embed` is a pure function of the teacher's parameters, for computing the embeddings
online in the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax import files as files_lib
from medvqa_jax.models import layers, state_dict

log = logging.getLogger(__name__)

# 2: captions cleaned and images resized (not cropped) to the teacher's size, as the student's
# pipeline gives them; caches of format 1 (raw captions, centre crops) are refused.
# 3: each example's image id, so that a cache made from other images is refused.
# 4: images embedded as the built dataset stores them (shrunk to max_side, re-encoded), as
# the online teacher sees them; format 3 embedded the original files.
# 5: the teacher's fingerprint covers its tokenizer's vocabulary, and a multi-view cache
# holds the digest of each example's second image (only its presence was checked).
# 6: the fingerprint covers the towers' settings (activation, layer-norm epsilon and place,
# pooling, projection...), which change the embeddings without changing the weights.
FORMAT_VERSION = 6


def params_fingerprint(*trees) -> str:
  h = hashlib.sha256()
  for tree in trees:
    for path, leaf in sorted(state_dict.flatten(tree).items()):
      leaf = np.asarray(leaf)
      h.update(f"{path}:{leaf.dtype}:{leaf.shape}".encode())
      h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def settings_fingerprint(*modules) -> str:
  """A digest of the towers' settings (`amif.tower_settings`: not the compute dtype, the
  attention kernel or dropout, which change the embeddings by rounding at most)."""
  from medvqa_jax.models import amif
  fields = [amif.tower_settings(m) for m in modules]
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def dataset_fingerprint(ids: Sequence[str], captions: Sequence[str]) -> str:
  h = hashlib.sha256()
  for i, c in sorted(zip(map(str, ids), captions)):
    h.update(f"{len(i)}:{i}{len(c)}:{c}".encode())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class Teacher:
  image: Any
  image_params: Any
  text: Any
  text_params: Any
  tokenizer: Any
  logit_scale: float

  @property
  def image_size(self) -> int:
    return self.image.image_size

  def embed(self, pixels, input_ids, attention_mask):
    """L2-normalised (image, text) embeddings: the towers' projected pooled outputs."""
    return self.apply((self.image_params, self.text_params), pixels, input_ids, attention_mask)

  def apply(self, params, pixels, input_ids, attention_mask):
    """`embed` with the (image, text) parameters as an argument (to pass them to a jitted
    function rather than embed them in it as constants)."""
    image = self.image.apply({"params": params[0]}, pixels)
    text = self.text.apply({"params": params[1]}, input_ids, attention_mask)
    pick = lambda out: out["embedding"] if "embedding" in out else out["pooled"]
    return layers.l2_normalize(pick(image)), layers.l2_normalize(pick(text))

  def fingerprint(self) -> str:
    return (params_fingerprint(self.image_params, self.text_params) +
            f"-m{settings_fingerprint(self.image, self.text)}"
            f"-{self.image_size}px-{self.tokenizer.max_len}tok{self.tokenizer.fingerprint()}"
            f"-s{self.logit_scale:.4f}")


# A randomly initialised teacher's (tests, smoke runs): CLIP's initial scale, 1 / 0.07.
INIT_LOGIT_SCALE = 1 / 0.07


def _checkpoint_logit_scale(cfg) -> float | None:
  if cfg.source == "init":
    return INIT_LOGIT_SCALE
  if not cfg.checkpoint:
    return None
  state = state_dict.read_state_dict(cfg.checkpoint, cfg.source)
  if "logit_scale" not in state:
    return None
  return float(np.exp(np.asarray(state["logit_scale"], np.float64)))


def from_config(config) -> Teacher:
  """The teacher of `config.teacher`: towers, tokenizer and logit scale (the checkpoint's
  exp(logit_scale) unless `teacher.logit_scale` is set; CLIP's initial 1/0.07 for a randomly
  initialised teacher). The teacher reads the captions at `teacher.text.max_len` tokens, or,
  unset, at the student's `model.text.max_len` (at most what its text tower reads)."""
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import towers
  tc = config.teacher
  for part in ("image", "text"):
    if tc[part].source != "init" and tc[part].get("fresh"):
      raise ValueError(f"teacher.{part}.fresh={tuple(tc[part].fresh)}: the teacher is frozen, "
                       "so parameters initialised fresh would stay random (e.g. a projection "
                       "its checkpoint lacks): give it a checkpoint that holds them all")
  from medvqa_jax.models import amif
  # Run as the student's stacks are (model.compute: the attention kernel, scan, remat), which
  # changes the embeddings by rounding at most (and the fingerprint not at all).
  compute = amif.compute_of(config)
  with state_dict.shared_reads():  # One read of a checkpoint that holds all three.
    image, image_params = towers.from_config(tc.image, seed=1000, compute=compute,
                                             where="teacher.image")
    text, text_params = towers.from_config(tc.text, seed=1001, compute=compute,
                                           where="teacher.text")
    scale = tc.get("logit_scale") or _checkpoint_logit_scale(tc.image)
  if scale is None:
    raise ValueError("the teacher's checkpoint has no logit_scale: set "
                     "--config.teacher.logit_scale")
  rounded = [f"teacher.{part}.dtype={tc[part].dtype}" for part in ("image", "text")
             if jnp.dtype(towers.dtype_of(tc[part].get("dtype", "float32"))).itemsize < 4]
  if rounded:  # The bf16 presets leave the teacher in float32; someone set this.
    log.warning("%s: the teacher's embeddings are the soft labels' source, which are a "
                "softmax of their similarities times the logit scale (%.1f). bf16 rounds the "
                "similarities by up to about 0.01, which moves those logits by up to about "
                "%.1f: the labels change, not just round. Compute the teacher in float32 (the "
                "default; its embeddings are cached once, or cost only its forward pass online)",
                " and ".join(rounded), float(scale), 0.01 * float(scale))
  tokenizer = tokenizer_lib.from_config(tc.text, "teacher.text")
  if not tc.text.get("max_len"):  # The student's length, as the reference's teacher reads.
    student = config.model.text.max_len
    tokenizer.max_len = min(student, tokenizer_lib.positions(text) or student)
  teacher = Teacher(image, image_params, text, text_params, tokenizer, float(scale))
  tokenizer_lib.check_fits(teacher.tokenizer, {"teacher's text tower": text}, "teacher.text")
  size = teacher.image_size  # Widths only: two text tokens do.
  widths = jax.eval_shape(teacher.embed, jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
                          *[jax.ShapeDtypeStruct((1, 2), np.int32)] * 2)
  if widths[0].shape[-1] != widths[1].shape[-1]:
    raise ValueError(
        f"the teacher's image embeddings are {widths[0].shape[-1]} wide and its text "
        f"embeddings {widths[1].shape[-1]}: its similarities need one shared space, so "
        "teacher.image and teacher.text must be the two towers of one CLIP-like model, with "
        "their projections")
  return teacher


# ---- the cache file ---------------------------------------------------------------------

@dataclasses.dataclass
class TeacherCache:
  ids: np.ndarray            # (N,) str
  image: np.ndarray          # (N, D) float32, L2-normalised
  text: np.ndarray           # (N, D)
  image2: np.ndarray | None  # (N, D) for multi-view data
  meta: dict
  image_ids: np.ndarray      # (N,) str: the digest of each example's (first) stored image
  image2_ids: np.ndarray | None = None  # (N,) str: and of its second, for multi-view data

  def __post_init__(self):
    self._row = {str(i): r for r, i in enumerate(self.ids)}

  @property
  def logit_scale(self) -> float:
    return float(self.meta["logit_scale"])

  def save(self, path: str | os.PathLike):
    """Written to a temporary file, flushed to disk and renamed: an interrupted write leaves
    no cache, and one renamed into place survives a power loss whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files_lib.temporary(path)
    arrays = dict(ids=np.asarray(self.ids, str), image=self.image, text=self.text,
                  meta=np.asarray(json.dumps(self.meta)),
                  image_ids=np.asarray(self.image_ids, str))
    if self.image2 is not None:
      arrays.update(image2=self.image2, image2_ids=np.asarray(self.image2_ids, str))
    try:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TeacherCache":
    path = Path(path)
    if not path.exists():
      raise FileNotFoundError(f"teacher cache {path} does not exist: build it with "
                              "`python launch/cache_teacher.py`")
    unreadable = lambda e: ValueError(f"teacher cache {path} is unreadable or incomplete: {e}")
    try:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
      meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise unreadable(e) from None
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"teacher cache {path} has format {meta.get('format')}, expected "
                       f"{FORMAT_VERSION}: rebuild it")
    try:
      return cls(arrays["ids"], arrays["image"], arrays["text"], arrays.get("image2"), meta,
                 arrays["image_ids"], arrays["image2_ids"] if "image2" in arrays else None)
    except KeyError as e:
      raise unreadable(e) from None

  def check(self, ids: Sequence[str], captions: Sequence[str], image_ids: Sequence[str],
            teacher_fingerprint: str, path: str = "the teacher cache",
            image2_ids: Sequence[str] | None = None, whose: str = "the configured one"):
    """Refuses a cache that was made by another teacher or for other data (other examples,
    captions or images, or another number of images per example than the dataset's: two
    where `image2_ids`, the digests of the examples' second images, are given). whose: the
    teacher `teacher_fingerprint` is, as the refusal names it."""
    multi_view = image2_ids is not None
    if self.meta["teacher"] != teacher_fingerprint:
      raise ValueError(f"{path} was computed by another teacher ({self.meta['teacher']}), "
                       f"not {whose} ({teacher_fingerprint}): rebuild it with "
                       "`python launch/cache_teacher.py` or point the config at the right cache")
    if (self.image2 is not None) != multi_view:
      count = lambda two: "two images (views)" if two else "one image"
      raise ValueError(
          f"{path} holds {count(self.image2 is not None)} per example, the dataset "
          f"{count(multi_view)}: without the second view's embeddings the imvc target would "
          "be the first view's, and with them where the dataset has none, another image's. "
          "Rebuild it for this dataset with `python launch/cache_teacher.py`")
    missing = [i for i in map(str, ids) if i not in self._row]
    if missing:
      raise ValueError(f"{path} has no embeddings for {len(missing)} example(s) of the "
                       f"dataset, e.g. {missing[:5]}: rebuild it for this dataset")
    if dataset_fingerprint(ids, captions) != self.meta["dataset"]:
      raise ValueError(f"{path} was computed for other data (its captions or examples "
                       "differ from the dataset's): rebuild it for this dataset")
    seconds = image2_ids if multi_view else [None] * len(image_ids)
    other = [i for i, m, m2 in zip(map(str, ids), image_ids, seconds)
             if self.image_ids[self._row[i]] != m
             or (multi_view and self.image2_ids[self._row[i]] != m2)]
    if other:
      raise ValueError(
          f"{path} was computed from other images than the dataset's for {len(other)} "
          f"example(s), e.g. {other[:5]} (or saw them stored at another size): rebuild it "
          "with `python launch/cache_teacher.py` and the training config, its "
          "--config.data.dir included (it reads the images the dataset there stores)")

  def lookup(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Teacher embeddings for a batch of example ids, as the batch fields the loss reads."""
    try:
      rows = np.asarray([self._row[str(i)] for i in ids])
    except KeyError as e:
      raise KeyError(f"example {e.args[0]!r} is not in the teacher cache") from None
    out = {"teacher_image": self.image[rows], "teacher_text": self.text[rows],
           "teacher_scale": np.float32(self.logit_scale)}
    if self.image2 is not None:
      out["teacher_image2"] = self.image2[rows]
    return out


def compute_cache(teacher: Teacher, records: Sequence[dict], batch_size: int = 64,
                  progress: bool = True) -> TeacherCache:
  """Embeds every record ({"id", "image", "caption"[, "image2"]}: `DatasetRecords`, whose
  images are the stored bytes the online teacher decodes; or image files) with the teacher:
  un-augmented images resized to its resolution, cleaned captions. Each record's image id is
  the digest of its image's bytes (a built dataset's `image_id`; and of its second image's),
  for `TeacherCache.check`. The records are taken a batch at a time: of a lazy sequence
  (`DatasetRecords`), only one batch's images are in memory at once."""
  from tqdm import tqdm

  from medvqa_jax.data import augment, builders
  from medvqa_jax.data import image as image_lib
  from medvqa_jax.data import text as text_lib
  if not len(records):
    raise ValueError("no records to embed")
  multi_view = "image2" in records[0]
  # The parameters as an argument: closed over, they would be compiled in as constants.
  jitted = jax.jit(teacher.apply)
  params = (teacher.image_params, teacher.text_params)
  embed = lambda *inputs: jitted(params, *inputs)
  out = {"image": [], "text": [], "image2": []}
  ids, captions, image_ids, image2_ids = [], [], [], []
  first_of = {}  # Each id's record number.

  def stored(r, key):  # An image's bytes: its pixels and its image id.
    if isinstance(r[key], bytes):
      return r[key]
    try:
      return Path(r[key]).read_bytes()
    except OSError as e:
      raise ValueError(f"record {r['id']} ({key} {r[key]}): {e.strerror}") from None

  load = lambda data: augment.resize(np.asarray(image_lib.open_image(data)),
                                     teacher.image_size)
  bar = tqdm(total=len(records), desc="teacher embeddings", unit="ex", disable=not progress)
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    n = len(chunk)
    for k, r in enumerate(chunk, start):
      rid = str(r["id"])
      if rid in first_of:
        raise ValueError(f"example ids must be unique: records {first_of[rid]} and {k} are "
                         f"both {rid!r}")
      if ("image2" in r) != multi_view:
        raise ValueError(f"record {k} ({rid}) {'lacks' if multi_view else 'has'} a second "
                         f"image ('image2'), which record 0 {'has' if multi_view else 'lacks'}:"
                         " a corpus has one image per example throughout, or two")
      first_of[rid] = k
      ids.append(rid)
      captions.append(r["caption"])
    pad = batch_size - n if len(records) > batch_size else 0  # One compiled shape.
    try:
      first = [stored(r, "image") for r in chunk]
      pixels = np.stack([load(b) for b in first + first[:1] * pad])
      if multi_view:
        second = [stored(r, "image2") for r in chunk]
        pixels2 = np.stack([load(b) for b in second + second[:1] * pad])
        image2_ids += [builders.image_digest(b) for b in second]
      image_ids += [builders.image_digest(b) for b in first]
    except ValueError as e:
      raise ValueError(f"records {start}..{start + n - 1}: {e}") from None
    cleaned = [text_lib.caption(c) for c in captions[start:]]
    tokens = teacher.tokenizer(cleaned + cleaned[:1] * pad)
    image, text = embed(pixels, tokens["input_ids"], tokens["attention_mask"])
    out["image"].append(np.asarray(image)[:n])
    out["text"].append(np.asarray(text)[:n])
    if multi_view:
      out["image2"].append(np.asarray(embed(pixels2, tokens["input_ids"],
                                            tokens["attention_mask"])[0])[:n])
    bar.update(n)
  bar.close()
  meta = {"format": FORMAT_VERSION, "teacher": teacher.fingerprint(),
          "dataset": dataset_fingerprint(ids, captions),
          "logit_scale": teacher.logit_scale, "count": len(ids)}
  return TeacherCache(np.asarray(ids, str), np.concatenate(out["image"]),
                      np.concatenate(out["text"]),
                      np.concatenate(out["image2"]) if multi_view else None, meta,
                      np.asarray(image_ids, str),
                      np.asarray(image2_ids, str) if multi_view else None)


class DatasetRecords(Sequence):
  """The examples of a built caption corpus's split as `compute_cache` takes them: id,
  caption and the stored image's JPEG bytes (and image2's, of a multi-view corpus), the very
  ids, captions and images the training pipeline reads. Each is read from the dataset when
  it is asked for, not held: a corpus's stored images can be many GB."""

  def __init__(self, data_dir, name: str, split: str = "train"):
    from medvqa_jax.data import builders
    self._source = builders.load(data_dir, name, split, decode_images=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[k] for k in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    from medvqa_jax.data.splits import text_value as text
    ex = self._source[i % len(self)]
    record = {"id": text(ex["id"]), "caption": text(ex["caption"]), "image": ex["image"]}
    if "image2" in ex:
      record["image2"] = ex["image2"]
    return record
