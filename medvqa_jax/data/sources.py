"""Readers of each dataset's own download layout, to common records.

A reader returns {split: [record or Bad]}. A VQA record is a dict with `id` (stable, unique),
`image` (a path, or encoded bytes), `image_id`, `question`, `answers` (the reference and its
alternatives), `answer_type` (the dataset's own field, trimmed and upper-cased; "" where it
has none) and `question_type` (VQA-RAD's question_type, SLAKE's content_type, PathVQA's
question_type, VQA-Med-2019's category). A caption record has `id`, `image`, `caption`, and
for multi-view studies `image2`, `view`, `view2`. A `Bad` names the file and record and says
what is wrong; images are checked when the dataset is built.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import pickle
import posixpath
import re
from pathlib import Path, PureWindowsPath
from typing import Callable

from medvqa_jax.data.answers import answer_type as clean_type

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Bad:
  where: str    # file and record
  reason: str

  def __str__(self):
    return f"{self.where}: {self.reason}"


def _need(path: Path, what: str) -> Path:
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: expected {what}")
  return path


def _read_text(path: Path) -> str:
  """A text file's contents, as written (line ends untranslated: a csv field may hold CRLF):
  UTF-8, with or without the byte-order mark that spreadsheet and Windows editors write (it
  would otherwise stick to the first field's name)."""
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      return f.read()
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason}); save "
                     "it as UTF-8") from None
  except OSError as e:  # A folder, or a file this user may not read.
    raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _numbered_lines(path: Path):
  """(line number, line) of a text file whose lines end in LF or CRLF. Not str.splitlines: it
  also breaks at U+2028, U+0085 and other separators, which JSON strings and captions may
  hold raw."""
  for n, line in enumerate(_read_text(path).split("\n"), 1):
    yield n, line.removesuffix("\r")


def _load_json(path: Path):
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    # The column too: the datasets' JSON files are one line each.
    raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})"
                     ) from None


def _load_records(path: Path) -> list:
  """A JSON file holding a list of records."""
  rows = _load_json(path)
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
  return rows


def _text(value, field: str) -> str:
  """A text field as stored: text, or a number (VQA-RAD has numeric answers and ids); None is
  "". Anything else (a list, an object, true/false) is refused, not stored as its repr."""
  if value is None:
    return ""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise TypeError(f"{field}: expected text, got {type(value).__name__} {value!r:.60}")
  if isinstance(value, float) and not math.isfinite(value):
    # JSON's NaN / Infinity (what pandas writes for a missing value), or a parquet null read
    # as NaN: stored, it read as the text "nan".
    raise ValueError(f"{field}: {value} (a missing value?)")
  return str(value)


def _vqa(rid, image, image_id, question, answers, atype="", qtype="", where=""):
  rid, question = _text(rid, "id"), _text(question, "question").strip()
  if answers is None or (isinstance(answers, list) and None in answers):
    # JSON's null, a parquet null: a missing answer, not an empty one (stored as one, a test
    # question that no prediction could answer).
    return Bad(where, "answer: null (a missing value?)")
  answers = [_text(a, "answer").strip() for a in
             (answers if isinstance(answers, list) else [answers])]
  answers = [a for a in answers if a]
  if not question:
    return Bad(where, "empty question")
  if not rid.strip():
    return Bad(where, "no id")
  # An empty answer is kept (SLAKE's train split has one): it counts as a QA pair, and
  # normalises to "", which no vocabulary holds.
  answers = answers or [""]
  return dict(id=rid, image=image, image_id=_text(image_id, "image"),
              question=question, answers=answers,
              answer_type=clean_type(_text(atype, "answer type")),
              question_type=_text(qtype, "question type"))


def _image_key(name) -> str:
  """An image's id from its file name as the annotations give it, normalised ("./a.jpg" and
  "a.jpg", "x\\a.jpg" and "x/a.jpg" are one picture): a picture under two ids could fall on
  both sides of a held-out validation slice."""
  return posixpath.normpath(_text(name, "image").strip().replace("\\", "/"))


def _file_name(row: dict, field: str) -> str:
  """A row's image file name (its `field`), refused when missing, empty or not text."""
  name = _text(row[field], field).strip()
  if not name:
    raise ValueError(f"{field}: no image file name")
  return name


def _guarded(where: str, make: Callable[[], dict | Bad]) -> dict | Bad:
  """make(), or a Bad naming `where` when the row lacks a field or has one of the wrong type."""
  try:
    return make()
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    return Bad(where, f"malformed record ({type(e).__name__}: {e})")


def _records(path: Path, rows, make: Callable, keep: Callable | None = None) -> list:
  """Records of a file's rows (those `keep` accepts), each numbered by its place in the file."""
  out = []
  for n, row in enumerate(rows):
    if keep is not None and not keep(row):
      continue
    where = f"{path} record {n}"
    if not isinstance(row, dict):
      out.append(Bad(where, f"expected an object, got {type(row).__name__}"))
      continue
    item = _guarded(where, lambda: make(row, where))
    if isinstance(item, dict):
      item.setdefault("where", where)
    elif isinstance(item, Bad) and not item.where:  # `make` left `where` out.
      item.where = where
    out.append(item)
  return out


# ---- VQA-RAD ------------------------------------------------------------------------------

# VQA-RAD's annotators' question types, with the release's variants of one type made one:
# case ("Other"), two misspellings ("ATRIB", "PRSE", in the training split) and the order
# of a question's two types ("PRES, POS" and "POS, PRES", in both splits).
_RAD_MISSPELT = {"ATRIB": "ATTRIB", "PRSE": "PRES"}


def _rad_question_type(value) -> str:
  parts = {p.strip().upper() for p in str(value or "").split(",")} - {""}
  return ", ".join(sorted(_RAD_MISSPELT.get(p, p) for p in parts))


def _question_frame(row) -> bool:
  """Whether a row of the original release has a template rewrite ("frame") of its question."""
  frame = row.get("question_frame") if isinstance(row, dict) else None
  return frame is not None and str(frame).strip().upper() not in ("", "NULL")


def vqa_rad(source_dir: Path, test_frames: bool = True) -> dict:
  """The MEVF split (trainset.json, testset.json, images/) or the original public release
  (VQA_RAD Dataset Public.json, VQA_RAD Image Folder/; test = phrase_type "test*").

  The release keeps the template rewrite of a question ("Is/Are there a rib fracture?" for "Is
  there a rib fracture?"), its "frame", in a field of the question's row; the MEVF split made
  every frame a training question (1,267 of its 3,064), those of test questions too (284:
  same image, same answer). Both layouts give those training questions; `test_frames=False`
  leaves out the frames of test questions (in the MEVF files, the frame that follows a test
  question of the same image and answer: that split numbers a frame after its question)."""
  make = lambda folder: lambda r, where: _vqa(
      r["qid"], str(folder / _file_name(r, "image_name")), _image_key(r["image_name"]),
      r["question"], r["answer"],
      r.get("answer_type"), _rad_question_type(r.get("question_type")), where)
  if (source_dir / "trainset.json").exists():
    images = source_dir / "images"
    test_path = _need(source_dir / "testset.json", "the MEVF test split")
    test_rows, train_path = _load_records(test_path), source_dir / "trainset.json"
    # (Answers compared as text: the files hold some as numbers, 2 where another row has "2".)
    asked = {str(r.get("qid")): (r.get("image_name"), str(r.get("answer")).strip())
             for r in test_rows if isinstance(r, dict)}

    def keep(r):  # All but, with test_frames=False, the frames of test questions.
      if test_frames or not isinstance(r, dict) or r.get("phrase_type") != "frame":
        return True
      try:
        before = str(int(r["qid"]) - 1)
      except (KeyError, TypeError, ValueError):
        return True
      return asked.get(before) != (r.get("image_name"), str(r.get("answer")).strip())
    return {"train": _records(train_path, _load_records(train_path), make(images), keep),
            "test": _records(test_path, test_rows, make(images))}
  path = _need(source_dir / "VQA_RAD Dataset Public.json",
               "VQA-RAD: trainset.json (MEVF split) or 'VQA_RAD Dataset Public.json'")
  rows = _load_records(path)
  images = source_dir / "VQA_RAD Image Folder"
  phrase = lambda r: str(r.get("phrase_type") or "").strip().lower()
  # A row that is no object is reported once, with the training split; so is one whose
  # phrase_type, which says its split, is missing (a test question must not train).
  is_test = lambda r: isinstance(r, dict) and phrase(r).startswith("test")

  def question(r, where):
    if not phrase(r):
      raise ValueError("phrase_type: missing, so its split is unknown (a test question's "
                       "starts with 'test')")
    return make(images)(r, where)

  def frame(r, where):
    where = f"{where} (question_frame)"
    qid = _text(r["qid"], "qid").strip()
    if not qid:  # (It was made "None-frame".)
      raise ValueError("qid: missing, so its question_frame has no id")
    item = question({**r, "qid": f"{qid}-frame", "question": r["question_frame"]}, where)
    return {**item, "where": where} if isinstance(item, dict) else item
  frames = _records(path, rows, frame, keep=lambda r: _question_frame(r) and (
      test_frames or not is_test(r)) and bool(phrase(r)))  # (The question is reported.)
  return {"train": _records(path, rows, question, keep=lambda r: not is_test(r)) + frames,
          "test": _records(path, rows, question, keep=is_test)}


# ---- SLAKE --------------------------------------------------------------------------------

def slake(source_dir: Path, language: str = "en") -> dict:
  """SLAKE 1.0: train/validate/test.json, imgs/<img_name>; one language (q_lang)."""
  if (source_dir / "Slake1.0").is_dir():
    source_dir = source_dir / "Slake1.0"
  out, languages = {}, set()
  lang = lambda r: str(r.get("q_lang") or "").strip().lower()

  def make(r, where):
    if not lang(r):  # Reported, not dropped unseen: it may be a question of this language.
      raise ValueError("q_lang: missing, so the question's language is unknown")
    return _vqa(r["qid"], str(source_dir / "imgs" / _file_name(r, "img_name")),
                _image_key(r["img_name"]), r["question"], r["answer"], r.get("answer_type"),
                r.get("content_type"), where)
  for split, name in (("train", "train.json"), ("validation", "validate.json"),
                      ("test", "test.json")):
    path = _need(source_dir / name, "SLAKE's train.json, validate.json and test.json")
    rows = _load_records(path)
    languages |= {lang(r) for r in rows if isinstance(r, dict)} - {""}
    out[split] = _records(path, rows, make,
                          keep=lambda r: not isinstance(r, dict) or lang(r) in (language, ""))
  if languages and language not in languages:
    raise ValueError(f"{source_dir}: no SLAKE question is in the language {language!r} "
                     f"(--language, the records' q_lang); they are in "
                     f"{', '.join(map(repr, sorted(languages)))}")
  return out


# ---- PathVQA ------------------------------------------------------------------------------

_PATHVQA_SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))


def _yes_no_type(answer) -> str:
  return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"


def pathvqa(source_dir: Path) -> dict:
  """PathVQA in any of its three layouts: the original release (qas/<split>/<split>_qa.pkl,
  images/<split>/<image>.jpg), the Hugging Face copy as parquet (*<split>*.parquet with an
  `image` struct holding bytes), or its JSON export (train/val/test.json, validation.json for
  val, `image_path` with Windows separators)."""
  if (source_dir / "qas").is_dir():
    return _pathvqa_pkl(source_dir)
  if list(source_dir.rglob("*.parquet")):
    return _pathvqa_parquet(source_dir)
  if any(_pathvqa_json_file(source_dir, *names) for names in _PATHVQA_SPLITS):
    return _pathvqa_json(source_dir)
  raise FileNotFoundError(f"{source_dir}: no PathVQA layout found (qas/ with pkl files, "
                          "*.parquet files, or train/val/test.json)")


def _pathvqa_json_file(source_dir: Path, split: str, short: str) -> Path | None:
  """A JSON export's file of one split: <short>.json, or <split>.json as an export named
  after the Hugging Face splits writes it (validation.json); not both."""
  found = [p for p in dict.fromkeys((source_dir / f"{short}.json", source_dir / f"{split}.json"))
           if p.exists()]
  if len(found) > 1:
    raise ValueError(f"{source_dir}: {found[0].name} and {found[1].name} are both the {split} "
                     "split; keep one")
  return found[0] if found else None


def _pathvqa_pkl(source_dir: Path) -> dict:
  out = {}
  for split, short in _PATHVQA_SPLITS:
    path = source_dir / "qas" / short / f"{short}_qa.pkl"
    if not path.exists():
      continue
    try:
      with open(path, "rb") as f:
        rows = pickle.load(f)  # The release's own format; read only files you trust.
    except Exception as e:  # Truncated, empty or not a pickle: whatever unpickling raises.
      raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list):
      raise ValueError(f"{path}: expected a list of records, got {type(rows).__name__}")
    folder = source_dir / "images" / short

    def make(r, where, folder=folder, short=short):
      name = _file_name(r, "image")
      name = name if name.endswith((".jpg", ".png")) else name + ".jpg"
      return _vqa(f"{short}-{where.rsplit(' ', 1)[-1]}", str(folder / name), name,
                  r["question"], r["answer"], r.get("answer_type") or _yes_no_type(r["answer"]),
                  r.get("question_type", ""), where)
    out[split] = _records(path, rows, make)
  return out


def _pathvqa_parquet(source_dir: Path) -> dict:
  import pyarrow.parquet as pq
  out = {}
  # The split is read from the path inside the download only: a download kept under a
  # folder named "test" (or "train") would otherwise put every file in that split.
  split_of = lambda p, split, short: (p.name.startswith((short, split))
                                      or {short, split} & set(p.relative_to(source_dir).parts[:-1]))
  every = sorted(source_dir.rglob("*.parquet"))  # (One walk of the download.)
  unsplit = [p for p in every if not any(split_of(p, *names) for names in _PATHVQA_SPLITS)]
  if unsplit:  # Skipped without a word, they were part of a split left out.
    raise ValueError(
        f"{source_dir}: {', '.join(str(p.relative_to(source_dir)) for p in unsplit[:5])} "
        f"{'is' if len(unsplit) == 1 else 'are'} named by no split (a parquet file's name, or "
        "a folder it is in, starts with train, validation or val, or test): rename each after "
        "its split, or move it out of the folder")
  for split, short in _PATHVQA_SPLITS:
    files = [p for p in every if split_of(p, split, short)]
    records = []
    for path in files:
      try:
        rows = pq.read_table(path).to_pylist()
      except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) name no file.
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                         f"{e})") from None

      def make(r, where, path=path):
        image = r["image"]
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
          raise ValueError("image struct has no bytes")
        n = where.rsplit(" ", 1)[-1]
        return _vqa(f"{short}-{path.stem}-{n}", bytes(data), f"{path.stem}-{n}", r["question"],
                    r["answer"], r.get("answer_type") or _yes_no_type(r["answer"]),
                    r.get("question_type", ""), where)
      records += _records(path, rows, make)
    if files:
      out[split] = records
  return out


def _pathvqa_json(source_dir: Path) -> dict:
  out = {}
  for split, short in _PATHVQA_SPLITS:
    path = _pathvqa_json_file(source_dir, split, short)
    if path is None:
      continue

    def make(r, where, short=short):
      rel = PureWindowsPath(_file_name(r, "image_path")).as_posix()  # "images\\test\\x.jpg"
      n = where.rsplit(" ", 1)[-1]
      return _vqa(f"{short}-{n}", str(source_dir / rel), Path(rel).name, r["question"],
                  r["answer"], r.get("answer_type") or _yes_no_type(r["answer"]),
                  r.get("question_type", ""), where)
    out[split] = _records(path, _load_records(path), make)
  return out


# ---- VQA-Med-2019 -------------------------------------------------------------------------

_VQAMED_SPLITS = {
    "train": ("ImageClef-2019-VQA-Med-Training", "All_QA_Pairs_train.txt", "Train_images"),
    "validation": ("ImageClef-2019-VQA-Med-Validation", "All_QA_Pairs_val.txt", "Val_images"),
}
_VQAMED_TEST = ("VQAMed2019Test", "VQAMed2019_Test_Questions_w_Ref_Answers.txt",
                "VQAMed2019_Test_Images")


def _lines(path: Path):
  for n, line in _numbered_lines(path):
    if line.strip():
      yield n, line


_OPTIONAL = re.compile(r"\([^()]*\)")


def with_optional_parts(answers: list[str]) -> list[str]:
  """The VQA-Med-2019 test references' alternatives, each followed by its form without its
  "(...)" parts: the test set's README marks an optional part that way ("ct w/contrast (iv)":
  "ct w/contrast" is correct too). The full answer stays first (the one a closed-set
  vocabulary takes)."""
  out = []
  for a in answers:
    a, short = a.strip(), " ".join(_OPTIONAL.sub(" ", a).split())
    out += [x for x in dict.fromkeys((a, short)) if x and x not in out]
  return out


def vqa_med_2019(source_dir: Path) -> dict:
  """ImageCLEF VQA-Med 2019: All_QA_Pairs_{train,val}.txt (id|question|answer) with the
  category from QAPairsByCategory/C{1-4}_*.txt, and the test file id|category|question|answer
  ("#" separates alternative answers, "(...)" marks an optional part: `with_optional_parts`).
  Splits whose folder is absent are left out."""
  out = {}
  for split, (folder, qa_name, images) in _VQAMED_SPLITS.items():
    base = source_dir / folder
    if not base.is_dir():
      continue
    path = _need(base / qa_name, f"the {split} question/answer pairs")
    # A pair's category is found by its image id and question, compared without the spacing.
    key = lambda image_id, question: (image_id.strip(), " ".join(question.split()))
    category = {}
    for cat_file in sorted((base / "QAPairsByCategory").glob("C*_*.txt")):
      cat = cat_file.stem.split("_")[1].lower()  # C1_Modality_val -> modality
      for _, line in _lines(cat_file):
        parts = line.split("|")
        if len(parts) >= 2:
          category[key(parts[0], parts[1])] = cat
    records, unfiled = [], []
    for n, line in _lines(path):
      where = f"{path} line {n}"
      parts = line.split("|")
      if len(parts) != 3:
        records.append(Bad(where, f"expected id|question|answer, got {len(parts)} fields"))
        continue
      image_id, question, answer = parts
      cat = category.get(key(image_id, question), "")
      item = _vqa(f"{split}-{n}", str(base / images / f"{image_id}.jpg"), image_id,
                  question, answer.split("#"), "", cat, where)
      if isinstance(item, dict):
        item["where"] = where
        if not cat:
          unfiled.append(where)
      records.append(item)
    if unfiled:  # They count in the overall accuracy, and in no category's.
      log.warning("%d of the %s questions in %s are in none of the category files of %s "
                  "(e.g. %s): their category is left empty", len(unfiled), split, path.name,
                  base / "QAPairsByCategory", unfiled[0])
    out[split] = records
  folder, qa_name, images = _VQAMED_TEST
  path = source_dir / folder / qa_name
  if path.exists():
    records = []
    for n, line in _lines(path):
      where = f"{path} line {n}"
      parts = line.split("|")
      if len(parts) != 4:
        records.append(Bad(where, f"expected id|category|question|answer, got {len(parts)} "
                                  "fields"))
        continue
      image_id, cat, question, answer = parts
      item = _vqa(f"test-{n}", str(source_dir / folder / images / f"{image_id}.jpg"),
                  image_id, question, with_optional_parts(answer.split("#")), "",
                  cat.strip().lower(), where)
      if isinstance(item, dict):
        item["where"] = where
      records.append(item)
    out["test"] = records
  if not out:
    raise FileNotFoundError(f"{source_dir}: no VQA-Med-2019 folders found (expected "
                            f"{', '.join(f for f, _, _ in _VQAMED_SPLITS.values())} or {folder})")
  return out


# ---- pre-training corpora -----------------------------------------------------------------

def record_id(value, default: str) -> str:
  """A record's id as stored: its own (0 included), else `default` where it has none."""
  value = _text(value, "id")
  return default if value.strip() == "" else value


def clean_caption(caption) -> str:
  """A caption as stored (and as the teacher cache reads it): surrounding spaces removed."""
  return _text(caption, "caption").strip()


def _caption(rid, image, caption, where, **extra):
  caption = clean_caption(caption)
  if not caption:
    return Bad(where, "empty caption")
  return dict(id=str(rid), image=image, caption=caption, where=where, **extra)


def _csv_rows(path: Path, columns=()):
  """(line number, row or Bad) of a csv with a header line (a row spanning lines: its last
  line). A row of more fields than the header (an unquoted comma in a caption) is a Bad; a
  quote left open (which would swallow the rows after it) stops the file, naming the line
  where its row starts. columns: groups of column names, a header lacking every name of a
  group is refused (each row was a Bad for its empty field, which hid the cause)."""
  reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
  try:
    header = reader.fieldnames or []
    lacking = [" or ".join(group) for group in columns if not set(group) & set(header)]
    if header and lacking:
      raise ValueError(f"{path}: no {', no '.join(lacking)} column (its header line has "
                       f"{', '.join(header)})")
    for row in reader:
      n = reader.line_num
      if None in row:  # DictReader files the fields past the header's under None.
        yield n, Bad(f"{path} line {n}", f"{len(reader.fieldnames) + len(row[None])} fields, "
                     f"but the header has {len(reader.fieldnames)} (quote a field that holds "
                     "a comma)")
      else:
        yield n, row
  except csv.Error as e:
    # The row that failed starts after the last one read (line_num counts those lines).
    start = reader.line_num + 1
    unclosed = "; a quote opened in it is never closed" if "end of data" in str(e) else ""
    raise ValueError(f"{path} line {start}: not valid csv ({e}{unclosed})") from None


def _split_files(source_dir: Path, pattern: str) -> dict:
  """{split: file}: files named like <split>.<ext> or <anything>_<split>.<ext>, one per split
  (several are refused: only one would be read), or a single file as train. Beside split
  files, a file of the pattern named by no split is refused: it would not be read."""
  found, unsplit = {}, []
  for path in sorted(source_dir.glob(pattern)):
    stem = path.stem.lower()
    for split, names in (("train", ("train",)), ("validation", ("validation", "val")),
                         ("test", ("test",))):
      if stem in names or stem.endswith(tuple("_" + n for n in names)):
        found.setdefault(split, []).append(path)
        break
    else:
      unsplit.append(path)
  several = {split: paths for split, paths in found.items() if len(paths) > 1}
  if several:
    raise ValueError(f"{source_dir}: one {pattern} file per split is read, but " + "; ".join(
        f"{', '.join(p.name for p in paths)} are all {split} files"
        for split, paths in several.items()) +
        " (join them into one file, or move the others out of the folder)")
  if found and unsplit:
    raise ValueError(
        f"{source_dir}: {', '.join(p.name for p in unsplit)} "
        f"{'is' if len(unsplit) == 1 else 'are'} named by no split and would not be read "
        f"beside {', '.join(paths[0].name for paths in found.values())}: name each {pattern} "
        "file <split> or <anything>_<split> (train, validation or val, test), join it into "
        "its split's file, or move it out of the folder")
  out = {split: paths[0] for split, paths in found.items()}
  if not out:
    files = sorted(source_dir.glob(pattern))
    if len(files) == 1:
      out["train"] = files[0]
  if not out:
    raise FileNotFoundError(f"{source_dir}: no {pattern} files named by split "
                            "(train/validation/test)")
  return out


def roco(source_dir: Path) -> dict:
  """ROCO: a csv per split with the image path (column `image` or `name`, relative to the
  csv's folder or to an `images/` folder beside it) and `caption`."""
  out = {}
  for split, path in _split_files(source_dir, "*.csv").items():
    records = []
    for n, row in _csv_rows(path, (("image", "name", "image_path"), ("caption",))):
      where = f"{path} line {n}"
      if isinstance(row, Bad):
        records.append(row)
        continue
      name = row.get("image") or row.get("name") or row.get("image_path")
      if not name:
        records.append(Bad(where, "no image file name (its image, name or image_path field "
                                  "is empty)"))
        continue
      image = path.parent / name
      if not image.exists() and (path.parent / "images" / name).exists():
        image = path.parent / "images" / name
      records.append(_caption(record_id(row.get("id"), f"{split}-{n}"), str(image),
                              row.get("caption"), where))
    out[split] = records
  return out


def _jsonl(path: Path):
  for n, line in _numbered_lines(path):
    if not line.strip():
      continue
    where = f"{path} line {n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      yield n, where, Bad(where, f"not valid JSON ({e.msg} at character {e.pos + 1})")
      continue
    yield n, where, row if isinstance(row, dict) else Bad(where, "expected a JSON object")


def medicat(source_dir: Path) -> dict:
  """MedICaT: JSON lines with the figure's file (`pdf_hash` + `fig_uri`, or `fig_uri` alone,
  under `figures/`) and its `s2_caption`/`caption`; one file per split, or one file (train)."""
  out = {}
  for split, path in _split_files(source_dir, "*.jsonl").items():
    records = []
    for n, where, row in _jsonl(path):
      if isinstance(row, Bad):
        records.append(row)
        continue
      uri = row.get("fig_uri")
      if not uri:
        records.append(Bad(where, "no fig_uri"))
        continue
      name = f"{row['pdf_hash']}_{uri}" if row.get("pdf_hash") else uri
      records.append(_guarded(where, lambda: _caption(
          record_id(row.get("id"), Path(name).stem), str(source_dir / "figures" / name),
          row.get("s2_caption") or row.get("caption"), where)))
    out[split] = records
  return out


def _entries(value) -> list[str]:
  """A ";"-joined csv field's entries, stripped; trailing empty ones (a final ";") dropped."""
  entries = [e.strip() for e in (value or "").split(";")]
  while entries and not entries[-1]:
    entries.pop()
  return entries


def mimic_multiview(source_dir: Path) -> dict:
  """MIMIC-CXR studies: a csv per split, one study per row: `study_id`, `images` (";"-joined
  paths relative to the csv's folder), `views` (their ";"-joined view types), `report`. The
  first two images of different view types make the two views; a study with fewer is kept
  with its first image as both views only if it has one image."""
  out = {}
  for split, path in _split_files(source_dir, "*.csv").items():
    records = []
    for n, row in _csv_rows(path, (("images",), ("views",), ("report",))):
      where = f"{path} line {n}"
      if isinstance(row, Bad):
        records.append(row)
        continue
      # Paired by place; a trailing ";" ends either list, an empty entry inside one is bad.
      images, views = (_entries(row.get(field)) for field in ("images", "views"))
      if not images:
        records.append(Bad(where, "no images"))
        continue
      if len(views) != len(images):
        records.append(Bad(where, f"{len(images)} images but {len(views)} view types"))
        continue
      empty = [f"{field} entry {i + 1}" for field, entries in (("images", images),
                                                              ("views", views))
               for i, e in enumerate(entries) if not e]
      if empty:
        records.append(Bad(where, f"empty {', '.join(empty)}"))
        continue
      second = next((i for i in range(1, len(images)) if views[i] != views[0]), None)
      if second is None:
        second = 0 if len(images) == 1 else 1
      records.append(_caption(row.get("study_id") or f"{split}-{n}",
                              str(path.parent / images[0]), row.get("report"), where,
                              image2=str(path.parent / images[second]),
                              view=views[0], view2=views[second]))
    out[split] = records
  return out


def captions_jsonl(source_dir: Path) -> dict:
  """Any other corpus: JSONL of {"image", "caption"[, "id"]}, image paths relative to the
  file; one file per split (train.jsonl, ...) or a single file (train)."""
  out = {}
  for split, path in _split_files(source_dir, "*.jsonl").items():
    records = []
    for n, where, row in _jsonl(path):
      if isinstance(row, Bad):
        records.append(row)
      elif not row.get("image"):
        records.append(Bad(where, "no image"))
      else:
        records.append(_guarded(where, lambda: _caption(
            record_id(row.get("id"), f"{split}-{n}"), str(path.parent / row["image"]),
            row.get("caption"), where)))
    out[split] = records
  return out

