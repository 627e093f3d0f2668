"""tensorflow-datasets builders (array_record, no TensorFlow needed) for every dataset.

One builder per dataset reads the user's download layout through `sources` and writes
records with a stable id. Images are decoded once at build time (which finds corrupt ones),
converted to RGB and optionally shrunk to `max_side`, and stored as JPEG (a grey picture as
its one band). Bad records (a missing or corrupt image, a malformed row, an empty question)
are reported with their file and record and skipped; if more than `max_bad_fraction` of a
split is bad the build fails (each split on its own: a test split short of its records gives
numbers that compare with no other).
TFDS builds into a temporary folder and renames it when complete, so an interrupted or
failed build leaves nothing that reads as a dataset, and building again is a no-op.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import io
import logging
import math
import numbers
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

from medvqa_jax import files as files_lib
from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import augment
from medvqa_jax.data import image as image_lib
from medvqa_jax.data import sources

log = logging.getLogger(__name__)

VERSION = "1.0.0"
# 1.1.0: caption examples carry an `image_id` (a digest of the stored image).
CAPTION_VERSION = "1.1.0"
# 1.1.0: PathVQA's image ids are digests of the stored image (one picture, one id).
PATHVQA_VERSION = "1.1.0"
# 1.1.0: VQA-RAD's question types cleaned (case, misspellings, order of two types).
# 1.2.0: the original release's template ("frame") questions are training questions, as in
# the MEVF split (they were left out); the reader option test_frames.
VQA_RAD_VERSION = "1.2.0"
# 1.1.0: VQA-Med-2019's test answers also without their optional "(...)" parts.
VQA_MED_VERSION = "1.1.0"


# What `max_side` bounds. The longer side, as it was, left elongated images (29% of PathVQA's
# are over 1.8:1) a shorter side under the model's input: every crop was then upsampled.
SHRINK = "shorter side"


class DataError(ValueError):
  """The source data has too many bad records (or none at all)."""


def encode_image(source, max_side: int | None, quality: int = 95) -> bytes:
  """JPEG bytes of an image file or bytes as RGB, upright (turned by its EXIF orientation), its
  shorter side at most `max_side` (`SHRINK`); a grey picture (three equal bands) as its one
  band, which decodes to the same pixels as the RGB JPEG it would otherwise be (libjpeg's
  luma of equal bands is the band, its chroma constant) in half the time (the pipeline then
  augments it as one band: `augment.image`). An upright RGB or grey JPEG that needs no
  shrinking is kept byte for byte. Of a file of several frames (a multi-page TIFF, an animated
  GIF or PNG), the first is stored, with a warning naming the file (not of a camera's MPO,
  whose first frame is the picture)."""
  if max_side is not None and max_side < 0:
    raise ValueError(f"max_side={max_side}: the shorter side to shrink images to, 0 or more")
  try:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    img = image_lib.decode(data)
    turned = image_lib.needs_turning(img)
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":
      log.warning("%s holds %d frames (%s): only the first is stored",
                  "an image given as bytes" if isinstance(source, bytes) else source, frames,
                  img.format)
  except FileNotFoundError:
    raise ValueError("image file not found") from None
  except IsADirectoryError:
    raise ValueError("a folder, not an image file") from None
  except (OSError, ValueError) as e:  # Reading the file, or `decode`'s reason.
    raise ValueError(f"unreadable image ({e})") from None
  if (img.format == "JPEG" and img.mode in ("RGB", "L") and not turned
      and not (max_side and min(img.size) > max_side)):
    return data
  try:
    img = image_lib.rgb(img, data)
  except ValueError as e:
    raise ValueError(f"unreadable image ({e})") from None
  if max_side and min(img.size) > max_side:
    scale = max_side / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.BICUBIC)
  if max(img.size) > _JPEG_MAX_SIDE:  # PIL's save then fails with "broken data stream".
    raise ValueError(f"{img.width} x {img.height} pixels: a side over JPEG's "
                     f"{_JPEG_MAX_SIDE:,} pixels (--max_side shrinks the shorter side only)")
  img = augment.one_band(img)
  out = io.BytesIO()
  try:
    img.save(out, format="JPEG", quality=quality)
  except OSError as e:
    raise ValueError(f"cannot be stored as JPEG ({e})") from None
  return out.getvalue()


_JPEG_MAX_SIDE = 65500


def read_as_built(path, max_side: int | None) -> Image.Image:
  """An image file as a build stores it (`encode_image`: upright, shrunk to max_side,
  re-encoded) and training's test path then decodes it: what predict.py and embed.py show
  the model, as eval.py does."""
  try:
    return image_lib.open_image(encode_image(path, max_side))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def image_digest(encoded: bytes) -> str:
  """A caption example's `image_id`: a digest of its stored image (`encode_image`'s bytes)."""
  return hashlib.sha1(encoded).hexdigest()[:20]


def _named(item: dict, image) -> str:
  """An example named in a problem report: its id, the image and where its record is."""
  image = image if isinstance(image, str) else "image bytes"
  record = f"; {item['where']}" if item.get("where") else ""
  return f"{item['id']} ({image}{record})"


class _LocalInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for a published copy of the dataset's metadata.

  TFDS asks its GCS bucket for it when a builder is made for a dataset not built yet. That
  look-up is switched off (no network), but it makes an empty temporary folder first and
  never removes it: one left in the temp folder per build. These datasets are never
  published there."""

  def initialize_from_bucket(self) -> None:
    pass


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Shared by the VQA and caption builders: subclasses set `name`, `reader` and features."""
  VERSION = tfds.core.Version(VERSION)
  reader = None

  def __init__(self, *, source_dir=None, max_side: int | None = None,
               max_bad_fraction: float = 0.01, splits=None, reader_options=None, **kwargs):
    self.source_dir = Path(source_dir) if source_dir else None
    self.max_side = max_side
    self.max_bad_fraction = max_bad_fraction
    self.only_splits = tuple(splits) if splits else None
    self.reader_options = dict(reader_options or {})
    self._report = {}
    # The data_dir given (TFDS's `self.data_dir` is the folder this build writes into, an
    # `incomplete.*` one while building): left out of the source's fingerprint when the
    # built datasets live inside the source folder, as `build` leaves it out when checking.
    self.root_dir = kwargs.get("data_dir")
    super().__init__(**kwargs)

  def _info(self):
    return _LocalInfo(builder=self, features=self._features(),
                      metadata=tfds.core.MetadataDict())

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
  # before a build and "downloaded and prepared" after it: nothing is downloaded here. To
  # stderr: stdout is the commands' JSON (prepare_data.py's summary, benchmark.py's line).
  def _log_download_bytes(self):
    shrink = (f", images shrunk to a shorter side of at most {self.max_side} px"
              if self.max_side else "")
    print(f"building {self.name} from {self.source_dir} into {self.root_dir}{shrink}...",
          file=sys.stderr, flush=True)

  def _log_download_done(self):
    print(f"built {self.name} in {self.data_dir}", file=sys.stderr, flush=True)

  def _read(self) -> dict:
    if self.source_dir is None:
      raise ValueError(f"building {self.name} needs source_dir")
    if self.source_dir.exists() and not self.source_dir.is_dir():
      raise ValueError(f"source folder {self.source_dir} is a file, not a folder (give the "
                       "folder that holds the download)")
    if not self.source_dir.is_dir():
      raise FileNotFoundError(f"source folder {self.source_dir} does not exist")
    split_items = type(self).reader(self.source_dir, **self.reader_options)
    if self.only_splits:
      unknown = set(self.only_splits) - set(split_items)
      if unknown:
        raise ValueError(f"{self.name} in {self.source_dir} has no split(s) {sorted(unknown)}; "
                         f"it has {sorted(split_items)}")
      split_items = {s: split_items[s] for s in self.only_splits}
    return split_items

  def _split_generators(self, dl_manager):
    del dl_manager
    split_items = self._read()
    self.info.metadata["build_options"] = build_options(
        self.name, max_side=self.max_side, splits=self.only_splits,
        reader_options=self.reader_options)
    self.info.metadata["source"] = source_fingerprint(self.source_dir, self.root_dir,
                                                      name=self.name)
    total = sum(len(v) for v in split_items.values())
    if total == 0:
      raise DataError(f"no records found in {self.source_dir}")
    empty = [split for split, items in split_items.items() if not items]
    if empty:  # (TFDS failed on it: "No examples were yielded", naming no file.)
      options = (f" with {', '.join(f'{k}={v!r}' for k, v in self.reader_options.items())}"
                 if self.reader_options else "")
      raise DataError(f"the {' and '.join(empty)} split(s) of {self.name} in "
                      f"{self.source_dir}{options} have no records: is the split's file "
                      "empty, or of another layout?")
    self._report = {"bad": []}
    root = os.path.normpath(os.path.abspath(self.source_dir)) + os.sep
    outside = []  # Image files named by absolute or ../ paths, outside the source folder.
    # Repeated ids and missing image files are found before anything is written; corrupt
    # images while encoding.
    for split, items in split_items.items():
      first: dict = {}
      for i, item in enumerate(items):
        if not isinstance(item, dict):
          continue
        where = item.get("where") or f"{split} record {i}"
        if item["id"] in first:
          items[i] = sources.Bad(where, f"duplicate id {item['id']!r} (also {first[item['id']]})")
          continue
        first[item["id"]] = where
        if not isinstance(item["image"], bytes):
          for key in ("image", "image2"):
            if key in item and not Path(item[key]).exists():
              items[i] = sources.Bad(_named(item, item[key]), "image file not found")
              break
            if key in item and not os.path.normpath(os.path.abspath(item[key])).startswith(root):
              outside.append(item[key])
    if outside:
      log.warning("%d image files of %s lie outside its source folder %s (e.g. %s): they are "
                  "read, but the check that a later run's source is unchanged since this "
                  "build covers the source folder's files only", len(outside), self.name,
                  self.source_dir, outside[0])
    bad = {}
    for split, items in split_items.items():
      bad[split] = [str(b) for b in items if isinstance(b, sources.Bad)]
      self._report["bad"].extend(bad[split])
      for b in bad[split][:20]:
        log.warning("skipped %s", b)
      self._check_bad(split, bad[split], len(items))
    return {split: self._generate_examples(split, items, bad[split])
            for split, items in split_items.items()}

  def _check_bad(self, split: str, bad: list[str], total: int) -> None:
    """Fails the build when more than `max_bad_fraction` of a split's `total` records are
    bad. Per split: a share of the whole dataset would let its smallest split, the test split,
    lose many times that share of its records (a tenth of VQA-Med-2019's test questions
    within 1% of the dataset)."""
    if total and len(bad) == total:
      self._none_usable(split, bad, total)
    if total and len(bad) / total > self.max_bad_fraction:
      shown = "\n  ".join(bad[:20])
      raise DataError(
          f"{len(bad)} of the {total} records of the {split} split of {self.name} in "
          f"{self.source_dir} are bad ({len(bad) / total:.1%}, more than the allowed "
          f"{self.max_bad_fraction:.1%}: at most {most_bad(self.max_bad_fraction, total)}); "
          f"nothing was built. First problems:\n  {shown}\n"
          "To build it without them, allow more: launch/prepare_data.py "
          "--max_bad_fraction=FRACTION (the other commands read what it built)")

  def _none_usable(self, split: str, bad: list[str], total: int):
    """Fails the build of a split none of whose `total` records could be used: no limit
    helps there, and every record failing alike may be the reader's fault."""
    shown = "\n  ".join(bad[:20])
    raise DataError(
        f"none of the {total} records of the {split} split of {self.name} in "
        f"{self.source_dir} could be used; nothing was built. First problems:\n  {shown}\n"
        "When every record fails alike, the dataset's reader may be at fault "
        "(medvqa_jax/data/sources.py)")

  def _generate_examples(self, split, items, bad: list[str]):
    """The split's examples; bad: its records already found bad, to which those whose image
    fails to encode are added (and checked against the limit)."""
    cache: dict = {}
    good = 0
    images, types, yes_no = set(), Counter(), 0
    for item in items:
      if isinstance(item, sources.Bad):
        continue
      try:
        example = self._example(item, cache)
      except ValueError as e:
        problem = f"{_named(item, item['image'])}: {e}"
        self._report["bad"].append(problem)
        log.warning("skipped %s", problem)
        bad.append(problem)
        self._check_bad(split, bad, len(items))
        continue
      good += 1
      images.add(example["image_id"])
      if "answers" in item:
        types[item["answer_type"] or "(none)"] += 1
        yes_no += answers_lib.is_yes_no(item["answers"])
      yield item["id"], example
    if not good:  # Whatever the limit: TFDS would fail on the empty split, naming nothing.
      self._none_usable(split, bad, len(items))
    stats = {"images": len(images), "skipped": len(bad)}
    if types:
      stats.update(answer_type=dict(sorted(types.items())), yes_no_closed=yes_no,
                   yes_no_open=good - yes_no)
    self.info.metadata.setdefault("stats", {})[split] = stats
    self.info.metadata["skipped"] = list(self._report["bad"])

  def _image(self, source, cache):
    key = source if isinstance(source, str) else hash(source)
    if key not in cache:
      if len(cache) > 4096:
        cache.clear()
      cache[key] = encode_image(source, self.max_side)
    return cache[key]


class _VqaBuilder(_Builder):
  # Whether an example's `image_id` is a digest of its stored image instead of the reader's
  # (a file name): for layouts that store a copy of the picture per question.
  digest_image_ids = False

  def _features(self):
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "id": text, "image_id": text, "image": tfds.features.Image(encoding_format="jpeg"),
        "question": text, "answers": tfds.features.Sequence(text), "answer_type": text,
        "question_type": text})

  def _example(self, item, cache):
    image = self._image(item["image"], cache)
    out = {k: item[k] for k in ("id", "image_id", "question", "answers", "answer_type",
                                "question_type")}
    if self.digest_image_ids:
      out["image_id"] = image_digest(image)
    return {**out, "image": image}


class _CaptionBuilder(_Builder):
  """Caption corpora carry no image ids of their own: an example's `image_id` is a digest of
  its (first) stored image, so one picture under several ids or paths has one image id and
  the held-out validation slice (`splits.caption_splits`) never splits it."""
  VERSION = tfds.core.Version(CAPTION_VERSION)
  multi_view = False

  def _features(self):
    text = tfds.features.Text()
    image = tfds.features.Image(encoding_format="jpeg")
    features = {"id": text, "image_id": text, "image": image, "caption": text}
    if self.multi_view:
      features.update(image2=image, view=text, view2=text)
    return tfds.features.FeaturesDict(features)

  def _example(self, item, cache):
    image = self._image(item["image"], cache)
    out = {"id": item["id"], "image_id": image_digest(image),
           "caption": item["caption"], "image": image}
    if self.multi_view:
      out.update(image2=self._image(item["image2"], cache), view=item["view"],
                 view2=item["view2"])
    return out


class VqaRad(_VqaBuilder):
  name = "vqa_rad"
  reader = sources.vqa_rad
  VERSION = tfds.core.Version(VQA_RAD_VERSION)


class Slake(_VqaBuilder):
  name = "slake"
  reader = sources.slake


class PathVqa(_VqaBuilder):
  """PathVQA's JSON export and parquet copy store the picture once per question (the 200
  files of the JSON sample are 27 pictures): image ids are digests of the stored image, so
  that a held-out validation slice never shares a picture with training."""
  name = "pathvqa"
  reader = sources.pathvqa
  VERSION = tfds.core.Version(PATHVQA_VERSION)
  digest_image_ids = True


class VqaMed2019(_VqaBuilder):
  name = "vqa_med_2019"
  reader = sources.vqa_med_2019
  VERSION = tfds.core.Version(VQA_MED_VERSION)


class Roco(_CaptionBuilder):
  name = "roco"
  reader = sources.roco


class Medicat(_CaptionBuilder):
  name = "medicat"
  reader = sources.medicat


class MimicCxr(_CaptionBuilder):
  name = "mimic_cxr"
  reader = sources.mimic_multiview
  multi_view = True


class CaptionsJsonl(_CaptionBuilder):
  name = "captions_jsonl"
  reader = sources.captions_jsonl


BUILDERS = {b.name: b for b in (VqaRad, Slake, PathVqa, VqaMed2019, Roco, Medicat, MimicCxr,
                                CaptionsJsonl)}


def kind(name: str) -> str:
  """What dataset `name` holds: "vqa" (questions and answers, for fine-tuning) or "caption"
  (image-caption pairs, for pre-training)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  return "caption" if issubclass(BUILDERS[name], _CaptionBuilder) else "vqa"


def dataset_dir(data_dir, name: str) -> Path:
  builder = BUILDERS.get(name)
  return Path(data_dir) / name / (str(builder.VERSION) if builder else VERSION)


def is_built(data_dir, name: str) -> bool:
  return (dataset_dir(data_dir, name) / "dataset_info.json").exists()


def build_options(name: str, max_side=None, splits=None, reader_options=None) -> dict:
  """What a build's contents depend on besides its source folder, with the reader's defaults
  filled in (so that `language="en"` and no language are the same build of SLAKE)."""
  reader = BUILDERS[name].reader
  defaults = {k: p.default for k, p in inspect.signature(reader).parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {"max_side": int(max_side) if max_side else None,
          **({"shrink": SHRINK} if max_side else {}),  # Builds before it: the longer side.
          "splits": sorted(splits) if splits else None,
          "reader_options": {**defaults, **dict(reader_options or {})}}


# Files whose contents (not only sizes) a source fingerprint reads: the annotations (an edit
# that keeps the size, "2" -> "3", changes the dataset), not the images or large archives.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".dcm", ".webp")
_CONTENT_LIMIT = 64 * 2 ** 20
FINGERPRINT_SCHEME = 2  # 1: paths and sizes only.


def source_fingerprint(source_dir, exclude=None, scheme: int = FINGERPRINT_SCHEME,
                       name: str | None = None) -> dict:
  """The files of a download folder as a digest of their relative paths and sizes, and (scheme
  2) the contents of its annotation files (not images, nor files over 64 MiB). A build records
  it, so that a folder changed since is not silently served from the old build. Sizes, not
  times: a copy of the folder elsewhere is the same source.

  exclude: the data folder the build of dataset `name` writes to, whose outputs are no part
  of the source wherever they fall inside it (the data folder itself, when a subfolder; the
  built dataset's version folder and TFDS's incomplete.* ones, its downloads/ folder and the
  build's lock file, when the data folder is the source folder or holds it)."""
  root = Path(source_dir).resolve()
  data = Path(exclude).resolve() if exclude else None
  outputs = set() if data is None else {data, data / "downloads"}
  if data is not None and name is not None:
    outputs |= {dataset_dir(data, name), data / f".{name}.build-lock"}

  def output(path: Path) -> bool:
    path = path.resolve()
    return path != root and (path in outputs or (
        data is not None and name is not None and path.parent == data / name
        and path.name.startswith("incomplete.")))

  digest, count = hashlib.sha1(), 0
  for folder, subfolders, files in os.walk(root, followlinks=True):
    here = Path(folder).resolve()  # Once per folder: the only output file is the lock.
    subfolders[:] = sorted(d for d in subfolders if not output(here / d))
    for file_name in sorted(files):
      path = Path(folder) / file_name
      if here / file_name in outputs:
        continue
      try:
        size = path.stat().st_size
      except OSError:  # A dangling link.
        continue
      digest.update(f"{path.relative_to(root)}\0{size}\n".encode())
      if (scheme >= 2 and size <= _CONTENT_LIMIT
          and not file_name.lower().endswith(_IMAGE_SUFFIXES)):
        try:
          digest.update(hashlib.sha1(path.read_bytes()).digest())
        except OSError:  # Unreadable: its reader names it.
          pass
      count += 1
  return {"dir": str(root), "files": count, "digest": digest.hexdigest()[:16],
          "scheme": scheme}


def check_source(name: str, source_dir, data_dir) -> None:
  """Refuses a build of `name` in `data_dir` made from another source than `source_dir` (or
  from it before it changed). Builds that predate recorded sources are taken as they are,
  with a warning."""
  then = _built_metadata(data_dir, name).get("source")
  if then is None:
    log.warning("%s in %s was built before builds recorded their source folder: it is used "
                "as it is, unchecked against %s (delete that folder to rebuild it from there)",
                name, dataset_dir(data_dir, name), source_dir)
    return
  if not Path(source_dir).is_dir():
    raise FileNotFoundError(
        f"source folder {source_dir} not found ({name} is built in "
        f"{dataset_dir(data_dir, name)} from {then['dir']}: to use that build as it is, do "
        "not give a source folder)")
  now = source_fingerprint(source_dir, data_dir, then.get("scheme", 1), name)
  if now["digest"] != then["digest"]:
    raise ValueError(
        f"{name} in {dataset_dir(data_dir, name)} was built from {then['dir']} "
        f"({then['files']} files); {now['dir']} now differs ({now['files']} files, or "
        "other sizes or annotations). To build from it, delete that folder or build into "
        "another data_dir")


def _built_metadata(data_dir, name: str) -> dict:
  return tfds.builder_from_directory(str(dataset_dir(data_dir, name))).info.metadata or {}


def built_options(data_dir, name: str) -> dict | None:
  """The `build_options` an existing build was made with (None for builds that predate them)."""
  return _built_metadata(data_dir, name).get("build_options")


def build(name: str, source_dir, data_dir, **options) -> Path:
  """Builds dataset `name` from `source_dir` into `data_dir` (a no-op if already built with the
  same options; a build with other options is refused, not silently reused). One process
  builds at a time (a sweep's runs sharing data.dir): the others wait, then find it built."""
  kind(name)  # A known name.
  max_side = options.get("max_side")
  if max_side is not None and (isinstance(max_side, bool)
                               or not isinstance(max_side, numbers.Integral) or max_side < 0):
    # A negative side shrank every image to 1 x 1 pixels.
    raise ValueError(f"max_side={max_side!r}: the shorter side images are shrunk to, a whole "
                     "number of pixels (0 or None: kept as they are)")
  if not is_built(data_dir, name):
    # The folders this build makes around the dataset: removed again if it fails.
    root = Path(data_dir).absolute()
    # mkdir's FileExistsError or PermissionError was a traceback naming no setting.
    blocked = files_lib.unwritable(root)
    if blocked:
      raise ValueError(f"the data folder {root} cannot be made: {blocked[0]} is {blocked[1]}")
    for inner in (root / name, root / "downloads"):  # Where TFDS writes, the folders above
      blocked = files_lib.unwritable(inner)          # it being writable.
      if blocked:
        raise ValueError(f"{name} cannot be built in the data folder {root}: {blocked[0]} is "
                         f"{blocked[1]}")
    made = [root / name, root / "downloads" / "extracted", root / "downloads"]
    made = [f for f in made + [root, *root.parents] if not f.exists()]
    try:
      root.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # What os.access let through (root, on a filesystem of its own).
      raise ValueError(f"the data folder {root} cannot be made: {e.strerror} "
                       f"({e.filename})") from None
    lock_path = root / f".{name}.build-lock"
    with _locked(lock_path, name):
      # Removed by its holder (the processes waiting on it then find the dataset built), so
      # that the data folder is left as it was.
      try:
        if not is_built(data_dir, name):  # Or built by another process meanwhile.
          _build(name, source_dir, data_dir, options, made, lock_path)
          return dataset_dir(data_dir, name)
      finally:
        lock_path.unlink(missing_ok=True)
  wanted = build_options(name, **{k: options.get(k) for k in
                                  ("max_side", "splits", "reader_options")})
  have = _built_metadata(data_dir, name).get("build_options")  # None: from before options.
  if have is not None and have != wanted:
    show = lambda key, value: (value if value is not None else {
        "max_side": "full size", "splits": "all", "shrink": "longer side"}.get(key, value))
    flat = lambda o: {**{k: v for k, v in o.items() if k != "reader_options"},
                      **(o.get("reader_options") or {})}
    have_flat, wanted_flat = flat(have), flat(wanted)
    differ = ", ".join(f"{k} {show(k, have_flat.get(k))!r} (asked: {show(k, v)!r})"
                       for k, v in wanted_flat.items() if have_flat.get(k) != v
                       and not (k == "shrink" and have_flat["max_side"] is None))
    raise ValueError(f"{name} is already built in {dataset_dir(data_dir, name)} with other "
                     f"options: {differ}. Build into another data_dir, or delete that folder "
                     f"to rebuild it")
  if source_dir is not None:
    check_source(name, source_dir, data_dir)
  return dataset_dir(data_dir, name)


def most_bad(fraction: float, total: int) -> int:
  """The most bad records of `total` that a build allowing `fraction` of them lets through
  (bad / total <= fraction; not floor(fraction * total): 0.29 * 100 is 28.999...)."""
  n = math.floor(fraction * total)
  while n < total and (n + 1) / total <= fraction:
    n += 1
  return n


def _locked(path: Path, name: str):
  """`path` opened and locked exclusively, once its holder is done. The holder removes the file
  when done: a waiter then holds the lock of a removed file, while a build started meanwhile
  locks a new one, and both built at once (one removed the other's incomplete.* folder as
  "left by an interrupted build"). A lock on a file no longer at `path` is taken again."""
  while True:
    lock = open(path, "a")
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:  # A filesystem without locks: builds are not serialised there.
      log.warning("cannot lock %s (%s): do not build %s there from two runs at once",
                  path, e, name)
      return lock
    try:
      held, now = os.fstat(lock.fileno()), os.stat(path)
      if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
        return lock
    except FileNotFoundError:
      pass
    lock.close()


def _build(name: str, source_dir, data_dir, options: dict, made: list[Path], lock_path: Path):
  """The build itself, under `build`'s lock. made: the folders that did not exist before."""
  builder = BUILDERS[name](source_dir=source_dir, data_dir=str(data_dir),
                           file_format="array_record", **options)
  # What a killed build left behind (TFDS writes into incomplete.* and renames at the end):
  # never read, and not removed by TFDS. (No other build is running: this one holds the lock.)
  for stale in (Path(data_dir) / name).glob("incomplete.*"):
    log.info("removing %s, left by an interrupted build", stale)
    shutil.rmtree(stale, ignore_errors=True)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except BaseException:
    # A build that fails (a missing source file, too many bad records) leaves nothing
    # behind: TFDS removes its incomplete.* folder, and the folders made around it are
    # removed when they are new and empty (an existing or non-empty folder is never touched).
    lock_path.unlink(missing_ok=True)
    for folder in made:  # Innermost first.
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    raise


def load(data_dir, name: str, split: str, decode_images: bool = True):
  """A random-access source (no TensorFlow) of a built split: len() and [i] give examples
  with the images (image, and image2 of a multi-view corpus) decoded to uint8 (H, W, 3)
  arrays (their stored JPEG bytes with `decode_images=False`) and text as bytes."""
  folder = dataset_dir(data_dir, name)
  if not (folder / "dataset_info.json").exists():
    raise FileNotFoundError(f"dataset {name} is not built in {data_dir}: run "
                            f"`python launch/prepare_data.py --dataset={name} ...`")
  builder = tfds.builder_from_directory(str(folder))
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  decoders = None if decode_images else {
      key: tfds.decode.SkipDecoding() for key in ("image", "image2")
      if key in builder.info.features}
  return builder.as_data_source(split=split, decoders=decoders)


def answer_vocabulary(data_dir, name: str, splits=("train",), min_count: int = 1) -> list[str]:
  """The normalised answers of the chosen splits (train by default: the vocabulary, the GCA
  prior and the ranking candidates must not see test answers), most frequent first."""
  answers = []
  for split in splits:
    src = load(data_dir, name, split, decode_images=False)
    for i in range(len(src)):
      answers.append(src[i]["answers"][0].decode())
  return answers_lib.vocabulary(answers, min_count)


def summary(data_dir, name: str) -> dict:
  """Per split: examples (QA pairs or captions), distinct images, open/closed counts by the
  dataset's answer_type and by yes/no ground truth (gathered at build time); for a VQA
  dataset's splits other than train, what they share with it (`in_train`: the split's
  images that training questions are about; its questions that the model reads as a
  training question about the same image, `text.question`'s clean-up applied; and those of
  them with the same answers); and the skipped records."""
  builder = tfds.builder_from_directory(str(dataset_dir(data_dir, name)))
  meta = builder.info.metadata or {}
  out = {"dataset": name, "path": str(dataset_dir(data_dir, name)), "splits": {}}
  for split in builder.info.splits:
    stats = {"examples": builder.info.splits[split].num_examples}
    stats.update(meta.get("stats", {}).get(split, {}))
    out["splits"][split] = stats
  if kind(name) == "vqa" and "train" in out["splits"]:
    from medvqa_jax.data import splits as splits_lib  # (It imports this module.)
    records = lambda split: splits_lib.read_records(load(data_dir, name, split,
                                                         decode_images=False))
    train = records("train")
    for split in out["splits"]:
      if split != "train":
        out["splits"][split]["in_train"] = splits_lib.shared_with(train, records(split))
  skipped = list(meta.get("skipped", []))
  out["skipped"] = len(skipped)
  out["skipped_examples"] = skipped[:20]
  return out
