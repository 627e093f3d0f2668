"""The splits a run uses, from the `data` config: train, validation (the dataset's own, or a
seeded slice of train) and test, each a random-access source with its records' text fields,
and the answer set of the chosen protocol. A caption corpus (pre-training) gives train and
a held-out slice of it for validation.

Protocols (every output names the one that produced it):
  open-set (default): the answer vocabulary, the GCA prior and the ranking candidates come
    from train + validation only; no answer is taken from the test split. (A dataset's own
    training split can still hold its test answers: VQA-RAD's MEVF split, as published
    results use it, trains on template rewrites of 284 test questions with their images and
    answers, which data.reader_options.test_frames=False leaves out; see README's Data.)
  closed-set (the paper's): candidates from every split, test included, for comparability
    with published numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import builders
from medvqa_jax.data import text as text_lib

log = logging.getLogger(__name__)

OPEN_SET = "open-set: answers from train+validation"
CLOSED_SET = "closed-set (paper): answers from all splits, test included"
# eval.py --closed_set on a generative run trained open-set: only the candidates are the
# closed set's; the GCA prior, an input of the model, stays the one it was trained with.
CLOSED_CANDIDATES = ("closed-set candidates: answers from all splits, test included; GCA prior "
                     "from train+validation (trained open-set, not the paper's protocol)")


class Subset:
  """Examples `indices` of a random-access source."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


@dataclasses.dataclass
class Split:
  name: str
  source: object        # len() and [i]: examples, images as stored (JPEG bytes)
  records: list[dict]   # per example: id, image_id, question, answers, answer_type, question_type
  # Records of the built split skipped as bad at build time: the split's accuracies are over
  # the others.
  skipped: int = 0
  # The built split this is a part of (a held-out validation slice and the rest), if it is
  # one: its `skipped` records are that split's, none of them known to be in this part.
  part_of: str = ""


def _need(dc, field: str):
  value = dc.get(field)
  if not value:
    raise ValueError(f"the config names no {field!r} for the data: set --config.data.{field}=...")
  return value


_KINDS = {"vqa": ("a VQA dataset", "fine-tuning (model.head is not 'none')"),
          "caption": ("a caption corpus", "pre-training (model.head is 'none')")}


def check_kind(dc, kind: str, reader: str | None = None) -> None:
  """Refuses data.name when no builder has it or its dataset is not of `kind` ("vqa" or
  "caption", `builders.kind`), naming the datasets that fit. reader: what reads the data, if
  not the config's training (e.g. "launch/cache_teacher.py")."""
  name = _need(dc, "name")
  try:
    holds = builders.kind(name)
  except ValueError as e:
    raise ValueError(f"--config.data.name: {e}") from None
  if holds != kind:
    fits = ", ".join(n for n in sorted(builders.BUILDERS) if builders.kind(n) == kind)
    use = (f"fine-tune on it with configs/{name}.py" if holds == "vqa" else
           "pre-train on it with configs/pretrain_stage0.py or pretrain_stage1.py")
    runs = f"{reader} reads" if reader else f"this config runs {_KINDS[kind][1]}, which reads"
    raise ValueError(f"--config.data.name={name} is {_KINDS[holds][0]}, but {runs} "
                     f"{_KINDS[kind][0]} ({fits}): {use}")


def reader_options(dc, name: str) -> dict | None:
  """The options in data.reader_options that `name`'s reader takes (None where the config
  has no such field: a run's config from before it, whose build is read as it is)."""
  given = dc.get("reader_options")
  if given is None:
    return None
  takes = builders.build_options(name)["reader_options"]
  return {k: v for k, v in dict(given).items() if k in takes}


def ensure_built(dc) -> None:
  """Builds the dataset into data.dir from data.source_dir if it is not built yet; a build
  there from another source (or from data.source_dir before it changed), or with other
  reader options than data.reader_options (SLAKE's language, VQA-RAD's test_frames: other
  questions), is refused. One with another max_side is read as built, with a warning, and
  data.max_side set to the build's."""
  name, data_dir = _need(dc, "name"), _need(dc, "dir")
  options = reader_options(dc, name)
  if builders.is_built(data_dir, name):
    if dc.get("source_dir"):
      builders.check_source(name, dc.source_dir, data_dir)
    have = builders.built_options(data_dir, name)  # None: built before options were kept
    want = builders.build_options(name, max_side=dc.get("max_side"), reader_options=options)
    side = lambda o: (o["max_side"], o.get("shrink", "longer side") if o["max_side"] else None)
    if have is not None and side(have) != side(want):
      log.warning("%s in %s was built with max_side=%s (%s), not data.max_side=%s (%s): using "
                  "it as built", name, builders.dataset_dir(data_dir, name), *side(have),
                  *side(want))
      # What the run reads, and so records: predict.py shrinks an image file to the recorded
      # max_side to show the model what eval.py shows it (it took the config's 512).
      dc.max_side = have["max_side"]
    built = (have or {}).get("reader_options")
    if options is not None and built is not None and built != want["reader_options"]:
      differ = {k: v for k, v in built.items() if want["reader_options"].get(k) != v}
      raise ValueError(
          f"{name} in {builders.dataset_dir(data_dir, name)} was built with "
          + ", ".join(f"{k}={v!r}" for k, v in differ.items()) + ", not data.reader_options' "
          + ", ".join(f"{k}={want['reader_options'].get(k)!r}" for k in differ)
          + ": to read that build, set "
          + " ".join(f"--config.data.reader_options.{k}={v}" for k, v in differ.items())
          + "; or build into another data_dir")
    return
  if not dc.get("source_dir"):
    raise FileNotFoundError(
        f"dataset {name} is not built in {data_dir}: build it with `python launch/prepare_data.py "
        f"--dataset={name} --source_dir=DOWNLOAD --data_dir={data_dir}` or set "
        f"--config.data.source_dir=DOWNLOAD to build it on first use")
  log.info("building %s from %s into %s", name, dc.source_dir, data_dir)
  builders.build(name, dc.source_dir, data_dir, max_side=dc.get("max_side"),
                 reader_options=options)


def text_value(v) -> str:
  """A built dataset's text field (bytes from a data source) as str."""
  return v.decode() if isinstance(v, bytes) else str(v)


def read_records(source) -> list[dict]:
  """The text fields of every example of a (non-decoding) source."""
  out = []
  for i in range(len(source)):
    ex = source[i]
    out.append({"id": text_value(ex["id"]), "image_id": text_value(ex["image_id"]),
                "question": text_value(ex["question"]),
                "answers": [text_value(a) for a in ex["answers"]],
                "answer_type": text_value(ex["answer_type"]),
                "question_type": text_value(ex["question_type"])})
  return out


def shared_with(train: Sequence[dict], records: Sequence[dict]) -> dict:
  """What a split's `records` share with the training records `train` (each with image_id,
  question, answers): `images`, the split's images that training questions are about;
  `questions`, its questions that the model reads as a training question about the same
  image (`text.question`'s clean-up applied: VQA-RAD's frame "Is/Are there a rib
  fracture?" reads as its test question "Is there a rib fracture?"); `same_answers`, those of
  them whose (normalised) answers are the training question's too."""
  asked = lambda r: (r["image_id"], text_lib.question(r["question"]))
  answered = lambda r: (*asked(r), tuple(sorted(answers_lib.normalize(a) for a in r["answers"])))
  images, questions = {r["image_id"] for r in train}, {asked(r) for r in train}
  answers = {answered(r) for r in train}
  return {"images": len({r["image_id"] for r in records} & images),
          "questions": sum(asked(r) in questions for r in records),
          "same_answers": sum(answered(r) in answers for r in records)}


def _split(dc, split: str) -> Split:
  # Images as stored (JPEG bytes): the pipeline decodes them with PIL as it augments.
  source = builders.load(dc.dir, dc.name, split, decode_images=False)
  records = read_records(source)
  skipped = builders.summary(dc.dir, dc.name)["splits"][split].get("skipped", 0)
  return Split(split, source, records, skipped)


def _hold_out(dc, whole: Split) -> dict[str, Split]:
  """{"train", "val"}: the training split without and with its seeded `val_fraction` of
  images (whole images: no image on both sides)."""
  records = whole.records
  held = answers_lib.validation_slice([r["id"] for r in records], dc.val_fraction, seed=0,
                                      groups=[r["image_id"] for r in records])
  parts = {name: [i for i, r in enumerate(records) if (r["id"] in held) == (name == "val")]
           for name in ("train", "val")}
  names = {"train": dc.train_split,
           "val": f"{dc.train_split} (held-out {dc.val_fraction:.0%} of images)"}
  return {name: Split(names[name], Subset(whole.source, idx), [records[i] for i in idx],
                     whole.skipped, part_of=whole.name)
          for name, idx in parts.items()}


def vqa_splits(dc, need=("train", "val", "test")) -> dict[str, Split]:
  """{"train", "val", "test"} (those in `need`) for the `data` config; builds the dataset
  first if needed."""
  if "val" in need and not dc.val_split and not dc.val_fraction > 0:
    raise ValueError(f"{dc.name} is validated on a held-out slice of its training split "
                     f"(data.val_split is ''), so data.val_fraction must be > 0 (it is "
                     f"{dc.val_fraction})")
  # One split in two roles: the answers (vocabulary, GCA prior, candidates: train and
  # validation) or the checkpoint choice would see test, under the open-set label.
  roles = {"train": ("train_split", dc.train_split), "val": ("val_split", dc.val_split),
           "test": ("test_split", dc.test_split)}
  seen = {}  # split -> (role, flag) of the first role given it
  for role in ("train", "val", "test"):
    flag, split = roles[role]
    if role not in need or not split:
      continue
    if split in seen:
      first, first_flag = seen[split]
      raise ValueError(
          f"--config.data.{first_flag} and --config.data.{flag} are both {split!r}: the "
          f"{first} and {role} splits must differ (the answers and the checkpoint choice "
          "must not see the test split; to validate on a held-out slice of the training "
          "images, set --config.data.val_split=''; the paper's closed-set answers: "
          "--config.data.closed_set)")
    seen[split] = (role, flag)
  check_kind(dc, "vqa")
  ensure_built(dc)
  out = {}
  if "train" in need or ("val" in need and not dc.val_split):
    train = _split(dc, dc.train_split)
    if not dc.val_split:
      parts = _hold_out(dc, train)
      if "val" in need:
        out["val"] = parts["val"]
      train = parts["train"]
    if "train" in need:
      out["train"] = train
  if "val" in need and dc.val_split:
    try:
      out["val"] = _split(dc, dc.val_split)
    except ValueError as e:
      if "has no split" not in str(e):
        raise
      raise ValueError(f"{e}: to validate on a held-out slice of the training images "
                       f"instead, set --config.data.val_split='' (data.val_fraction of them, "
                       f"now {dc.val_fraction})") from None
  if "test" in need:
    out["test"] = _split(dc, dc.test_split)
  for name, split in out.items():
    if not split.records:
      raise ValueError(f"the {name} split ({split.name}) of {dc.name} in {dc.dir} is empty")
  return out


def caption_splits(dc) -> dict[str, Split]:
  """{"train"} and, when `val_fraction` > 0, {"val"}: a seeded slice of the training split's
  images (whole images: every example of a held-out picture, whatever its id or path, is in
  the slice) held out for validation. Builds the corpus first if needed. Records: id,
  image_id, caption (and image2_id, the digest of a multi-view example's second stored image,
  which the teacher cache's check reads)."""
  check_kind(dc, "caption")
  ensure_built(dc)
  if dc.val_split:
    raise ValueError(f"pre-training validates on a held-out slice of {dc.name}'s training split "
                     f"(data.val_fraction), not on a split of its own: set "
                     f"--config.data.val_split='' (it is {dc.val_split!r})")
  source = builders.load(dc.dir, dc.name, dc.train_split, decode_images=False)
  records = []
  for i in range(len(source)):
    example = source[i]
    records.append({"id": text_value(example["id"]), "image_id": text_value(example["image_id"]),
                    "caption": text_value(example["caption"])})
    if "image2" in example:
      records[-1]["image2_id"] = builders.image_digest(example["image2"])
  if not records:
    raise ValueError(f"the {dc.train_split} split of {dc.name} in {dc.dir} is empty")
  whole = Split(dc.train_split, source, records)
  return _hold_out(dc, whole) if dc.val_fraction > 0 else {"train": whole}


def answer_set(dc, splits: dict[str, Split] | None = None) -> tuple[list[str], str]:
  """(answer vocabulary, protocol): normalised answers, most frequent first, from train +
  validation, or from every split under the closed-set protocol."""
  splits = splits if splits is not None else vqa_splits(dc)
  use = ("train", "val", "test") if dc.closed_set else ("train", "val")
  missing = [s for s in use if s not in splits]
  if missing:
    splits = {**splits, **vqa_splits(dc, need=tuple(missing))}
  refs = [r["answers"][0] for s in use for r in splits[s].records]
  vocab = answers_lib.vocabulary(refs)
  if not vocab:
    raise ValueError(f"{dc.name}: no answers in {'+'.join(use)}")
  return vocab, CLOSED_SET if dc.closed_set else OPEN_SET


def majority_answer(records: list[dict]) -> str:
  """The most frequent normalised reference answer (the majority-answer baseline)."""
  return answers_lib.vocabulary(r["answers"][0] for r in records)[0]
