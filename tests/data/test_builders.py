"""TFDS builders: every layout round-trips, bad input is reported and bounded, builds are
atomic and idempotent, and the summary counts what the issue names."""

import csv
import io
import json
import logging
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from medvqa_jax.data import augment, builders, sources

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def _jpeg(path, seed, size=(40, 30)):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path, "JPEG")
  return path


def _decoded(path_or_bytes):
  src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  return np.asarray(Image.open(src).convert("RGB"))


def _rows(data_dir, name, split):
  src = builders.load(data_dir, name, split)
  dec = lambda v: v.decode() if isinstance(v, bytes) else v
  return {dec(ex["id"]): ex for ex in (src[i] for i in range(len(src)))}


def _text(v):
  return v.decode() if isinstance(v, bytes) else [x.decode() for x in v]


def test_vqa_rad_original_release_round_trips(tmp_path):
  src = tmp_path / "src"
  (src / "VQA_RAD Image Folder").mkdir(parents=True)
  recs = []
  for i in range(6):
    name = f"synpic{i}.jpg"
    _jpeg(src / "VQA_RAD Image Folder" / name, i)
    recs.append(dict(qid=str(i) if i == 0 else i, image_name=name, question=f"question {i}?",
                     answer="Yes" if i % 2 else f"answer {i}",
                     answer_type="CLOSED " if i % 2 else "OPEN", question_type="PRES",
                     phrase_type="test_freeform" if i >= 4 else "freeform"))
  (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
  builders.build("vqa_rad", src, tmp_path / "out")
  train, test = _rows(tmp_path / "out", "vqa_rad", "train"), _rows(tmp_path / "out", "vqa_rad",
                                                                     "test")
  assert sorted(train) == ["0", "1", "2", "3"] and sorted(test) == ["4", "5"]
  for r in recs:
    ex = {**train, **test}[str(r["qid"])]
    assert _text(ex["question"]) == r["question"] and _text(ex["answers"]) == [r["answer"]]
    assert _text(ex["answer_type"]) == r["answer_type"].strip()
    np.testing.assert_array_equal(ex["image"], _decoded(src / "VQA_RAD Image Folder" /
                                                        r["image_name"]))
  summary = builders.summary(tmp_path / "out", "vqa_rad")
  assert summary["splits"]["test"]["answer_type"] == {"CLOSED": 1, "OPEN": 1}
  assert summary["splits"]["train"]["yes_no_closed"] == 2



def test_a_build_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
  # TFDS made an empty temporary folder for every builder of a dataset not built yet (its
  # look-up of published metadata) and never removed it: one per build, piling up.
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  src, rows = _vqa_source(tmp_path, n=8)
  _write(src, rows[:6], rows[6:])
  builders.build("vqa_rad", src, tmp_path / "out")
  assert sorted(_rows(tmp_path / "out", "vqa_rad", "test")) == ["6", "7"]
  assert list(temp.iterdir()) == []


def _mevf_as_original_release(mevf: Path, out: Path) -> Path:
  """The MEVF files written back in the original release's layout: a row per free-form or
  paraphrased question (test ones "test_*"), with the frame MEVF numbers after it as the row's
  question_frame."""
  rows = {r["qid"]: (r, False) for r in json.loads((mevf / "trainset.json").read_text())}
  rows.update({r["qid"]: (r, True) for r in json.loads((mevf / "testset.json").read_text())})
  release = []
  for qid in sorted(rows):
    r, test = rows[qid]
    if r["phrase_type"] == "frame":
      continue
    after = rows.get(qid + 1, ({}, False))[0]
    release.append({**r, "phrase_type": ("test_" if test else "") + r["phrase_type"],
                    "question_frame": after["question"] if after.get("phrase_type") == "frame"
                    else "NULL", "question_rephrase": "NULL"})
  out.mkdir()
  (out / "VQA_RAD Dataset Public.json").write_text(json.dumps(release))
  (out / "VQA_RAD Image Folder").symlink_to(mevf / "images")
  return out


def test_vqa_rad_layouts_give_the_same_questions_frames_included(tmp_path):
  """The real MEVF split against the same questions in the original release's layout, where
  a question's template rewrite ("frame") is a field of its row: both give MEVF's 3,064
  training questions (1,267 frames; the release's reader once left them out, 1,797) and its
  451 test questions; without the frames of test questions (284), 2,780 in both."""
  from medvqa_jax.data import sources
  mevf = helpers.shared_data() / "vqa_rad"
  release = _mevf_as_original_release(mevf, tmp_path / "release")
  content = lambda recs: sorted((r["question"], tuple(r["answers"]), r["image_id"],
                                 r["answer_type"], r["question_type"]) for r in recs)
  for test_frames, train_count in ((True, 3064), (False, 2780)):
    a = sources.vqa_rad(mevf, test_frames=test_frames)
    b = sources.vqa_rad(release, test_frames=test_frames)
    assert len(a["train"]) == len(b["train"]) == train_count
    assert len(a["test"]) == len(b["test"]) == 451
    for split in ("train", "test"):
      assert content(a[split]) == content(b[split]), (test_frames, split)
  frames = [r for r in b["train"] if r["id"].endswith("-frame")]
  assert len(frames) == 983 and all("(question_frame)" in r["where"] for r in frames)
  # What is left out: frames with a test question's image and answer.
  left_out = set(content(sources.vqa_rad(mevf)["train"])) - set(content(a["train"]))
  asked = {(r["image_id"], tuple(r["answers"])) for r in a["test"]}
  assert left_out and all((q[2], q[1]) in asked for q in left_out)


def test_a_test_questions_frame_is_left_out_whatever_type_its_answer_is(tmp_path):
  """--notest_frames in the MEVF layout: a frame is a test question's by its place, image and
  answer, the answer compared as text (the files hold some answers as numbers: a frame's 2 is
  the test question's "2")."""
  from medvqa_jax.data import sources
  src = tmp_path / "rad"
  (src / "images").mkdir(parents=True)
  row = lambda qid, q, a, phrase: {"qid": qid, "image_name": "synpic1.jpg", "question": q,
                                   "answer": a, "answer_type": "OPEN", "question_type": "COUNT",
                                   "phrase_type": phrase}
  (src / "testset.json").write_text(json.dumps([row(10, "how many masses", "2", "test_freeform"),
                                                row(20, "how many ribs", "12 ", "test_freeform")]))
  (src / "trainset.json").write_text(json.dumps([
      row(11, "how many masses are seen", 2, "frame"),   # Of test question 10.
      row(21, "how many ribs are seen", 12, "frame"),    # Of 20.
      row(31, "how many lesions are seen", 2, "frame"),  # Of no test question.
      row(30, "how many lesions", 2, "freeform")]))
  kept = lambda **kw: sorted(r["question"] for r in sources.vqa_rad(src, **kw)["train"])
  assert kept() == ["how many lesions", "how many lesions are seen", "how many masses are seen",
                    "how many ribs are seen"]
  assert kept(test_frames=False) == ["how many lesions", "how many lesions are seen"]


def test_pathvqa_pkl_and_parquet_round_trip(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pkl = tmp_path / "pkl"
  for split in ("train", "val", "test"):
    (pkl / "qas" / split).mkdir(parents=True)
    (pkl / "images" / split).mkdir(parents=True)
    # Answers as the release writes them, "No" too; each question's category.
    rows = [dict(image=f"{split}_{i}", question=f"{split} q{i}?",
                 answer=["fat", "No", "no"][i], question_type=["what", "is", "does"][i])
            for i in range(3)]
    rows[2]["answer_type"] = "open"  # A record's own field is kept over the yes/no rule.
    for i in range(3):
      _jpeg(pkl / "images" / split / f"{split}_{i}.jpg", i)
    with open(pkl / "qas" / split / f"{split}_qa.pkl", "wb") as f:
      pickle.dump(rows, f)
  builders.build("pathvqa", pkl, tmp_path / "out1")
  val = _rows(tmp_path / "out1", "pathvqa", "validation")
  assert len(val) == 3 and sorted(_text(e["question"]) for e in val.values()) == \
      ["val q0?", "val q1?", "val q2?"]
  summary = builders.summary(tmp_path / "out1", "pathvqa")
  assert summary["splits"]["train"]["answer_type"] == {"CLOSED": 1, "OPEN": 2}
  assert sorted(_text(e["question_type"]) for e in val.values()) == ["does", "is", "what"]
  # Question ids are unique across the splits (each split numbers its questions from 0).
  ids = [k for split in ("train", "validation", "test")
         for k in _rows(tmp_path / "out1", "pathvqa", split)]
  assert len(ids) == len(set(ids)) == 9

  # The download sits under a folder named "test": only the path inside it says the split.
  parquet = tmp_path / "test" / "parquet" / "data"
  parquet.mkdir(parents=True)
  images = [_jpeg(tmp_path / f"p{i}.jpg", 10 + i).read_bytes() for i in range(4)]
  table = pa.table({"image": [{"bytes": b, "path": None} for b in images],
                    "question": [f"p{i}?" for i in range(4)], "answer": ["yes", "no", "a", "b"],
                    "question_type": ["is", "does", "what", "where"]})
  pq.write_table(table.slice(0, 3), parquet / "train-00000-of-00001.parquet")
  pq.write_table(table.slice(3, 1), parquet / "test-00000-of-00001.parquet")
  builders.build("pathvqa", tmp_path / "test" / "parquet", tmp_path / "out2")
  train = _rows(tmp_path / "out2", "pathvqa", "train")
  assert len(train) == 3 and len(_rows(tmp_path / "out2", "pathvqa", "test")) == 1
  by_q = {_text(e["question"]): e for e in train.values()}
  np.testing.assert_array_equal(by_q["p1?"]["image"], _decoded(images[1]))
  assert _text(by_q["p1?"]["question_type"]) == "does"
  # The parquet copy has no answer_type: yes/no answers are closed questions, others open.
  summary = builders.summary(tmp_path / "out2", "pathvqa")
  assert summary["splits"]["train"]["answer_type"] == {"CLOSED": 2, "OPEN": 1}
  # A parquet file that no split names was skipped without a word.
  pq.write_table(table.slice(0, 1), parquet / "pathvqa_extra.parquet")
  from medvqa_jax.data import sources
  with pytest.raises(ValueError, match=r"data/pathvqa_extra\.parquet is named by no split "
                     r"\(a parquet file's name, or a folder it is in, starts with train"):
    sources.pathvqa(tmp_path / "test" / "parquet")


def _caption_fixtures(tmp_path):
  roco = tmp_path / "roco"
  (roco / "images").mkdir(parents=True)
  with open(roco / "train.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "name", "caption"])
    for i in range(3):
      _jpeg(roco / "images" / f"r{i}.jpg", i)
      w.writerow([f"ROCO_{i}", f"r{i}.jpg", f"CT of the chest, case {i}"])
  medicat = tmp_path / "medicat"
  (medicat / "figures").mkdir(parents=True)
  with open(medicat / "train.jsonl", "w") as f:
    for i in range(3):
      _jpeg(medicat / "figures" / f"h{i}_fig{i}.jpg", 10 + i)
      f.write(json.dumps({"pdf_hash": f"h{i}", "fig_uri": f"fig{i}.jpg",
                          "s2_caption": f"Figure {i}: MRI"}) + "\n")
  mimic = tmp_path / "mimic"
  (mimic / "files").mkdir(parents=True)
  with open(mimic / "train.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["study_id", "images", "views", "report"])
    for i in range(3):
      paths = [f"files/s{i}_{v}.jpg" for v in range(3)]
      for v, p in enumerate(paths):
        _jpeg(mimic / p, 100 + 3 * i + v)
      w.writerow([f"s{i}", ";".join(paths), "PA;PA;LATERAL", f"No acute findings {i}."])
  jsonl = tmp_path / "jsonl"
  jsonl.mkdir()
  with open(jsonl / "corpus.jsonl", "w") as f:
    for i in range(3):
      _jpeg(jsonl / f"j{i}.jpg", 200 + i)
      f.write(json.dumps({"image": f"j{i}.jpg", "caption": f"caption {i}"}) + "\n")
  return roco, medicat, mimic, jsonl


def test_caption_corpora_round_trip(tmp_path):
  roco, medicat, mimic, jsonl = _caption_fixtures(tmp_path)
  out = tmp_path / "out"
  builders.build("roco", roco, out)
  rows = _rows(out, "roco", "train")
  assert _text(rows["ROCO_1"]["caption"]) == "CT of the chest, case 1"
  np.testing.assert_array_equal(rows["ROCO_1"]["image"], _decoded(roco / "images" / "r1.jpg"))
  builders.build("medicat", medicat, out)
  rows = _rows(out, "medicat", "train")
  assert _text(rows["h2_fig2"]["caption"]) == "Figure 2: MRI"
  builders.build("mimic_cxr", mimic, out)
  rows = _rows(out, "mimic_cxr", "train")
  s1 = rows["s1"]
  assert (_text(s1["view"]), _text(s1["view2"])) == ("PA", "LATERAL")  # Different views.
  np.testing.assert_array_equal(s1["image2"], _decoded(mimic / "files" / "s1_2.jpg"))
  # Training's records carry the digests of both stored images (the teacher cache's check).
  import ml_collections
  from medvqa_jax.data import splits
  records = splits.caption_splits(ml_collections.ConfigDict(dict(
      name="mimic_cxr", dir=str(out), source_dir="", train_split="train", val_split="",
      val_fraction=0.0, max_side=512)))["train"].records
  stored = builders.load(out, "mimic_cxr", "train", decode_images=False)
  assert [(r["image_id"], r["image2_id"]) for r in records] == [
      (builders.image_digest(ex["image"]), builders.image_digest(ex["image2"]))
      for ex in (stored[i] for i in range(len(stored)))]
  assert len({r["image2_id"] for r in records} | {r["image_id"] for r in records}) == 6
  builders.build("captions_jsonl", jsonl, out)
  rows = _rows(out, "captions_jsonl", "train")
  assert sorted(_text(r["caption"]) for r in rows.values()) == ["caption 0", "caption 1",
                                                                 "caption 2"]
  # A caption record's problems name its file and line.
  with open(roco / "train.csv", "a", newline="") as f:
    csv.writer(f).writerow(["ROCO_1", "r2.jpg", "again"])
  builders.build("roco", roco, tmp_path / "again", max_bad_fraction=0.5)
  (problem,) = builders.summary(tmp_path / "again", "roco")["skipped_examples"]
  assert problem == (f"{roco / 'train.csv'} line 5: duplicate id 'ROCO_1' (also "
                     f"{roco / 'train.csv'} line 3)")
  # A study whose second view is missing is skipped, named by that view's file.
  with open(mimic / "train.csv", "a", newline="") as f:
    csv.writer(f).writerow(["s9", "files/s0_0.jpg;files/gone.jpg", "PA;LATERAL", "Clear."])
  builders.build("mimic_cxr", mimic, tmp_path / "again", max_bad_fraction=0.5)
  (problem,) = builders.summary(tmp_path / "again", "mimic_cxr")["skipped_examples"]
  assert str(mimic / "files" / "gone.jpg") in problem and "not found" in problem, problem


def test_roco_reads_the_image_path_column(tmp_path):
  """ROCO's image column comes as image, name (the release's) or image_path."""
  roco = tmp_path / "roco"
  (roco / "images").mkdir(parents=True)
  _jpeg(roco / "images" / "r0.jpg", 0)
  (roco / "train.csv").write_text("image_path,caption\nr0.jpg,CT of the chest\n")
  (record,) = sources.roco(roco)["train"]
  assert record["image"] == str(roco / "images" / "r0.jpg")
  assert record["caption"] == "CT of the chest"


def _vqa_source(tmp_path, n=200):
  src = tmp_path / "src"
  (src / "images").mkdir(parents=True)
  for i in range(4):
    _jpeg(src / "images" / f"img{i}.jpg", i)
  rows = [dict(qid=i, image_name=f"img{i % 4}.jpg", question=f"q{i}?", answer="yes",
               answer_type="CLOSED", question_type="PRES") for i in range(n)]
  return src, rows


def _write(src, train, test=()):
  (src / "trainset.json").write_text(json.dumps(train))
  (src / "testset.json").write_text(json.dumps(list(test)))


def test_the_summary_counts_what_test_shares_with_training(tmp_path):
  """`in_train`: a test split's images that training questions are about, its questions that
  the model reads as a training question about the same image (after the question clean-up),
  and those of them with the same answer."""
  src, rows = _vqa_source(tmp_path, n=8)  # Training: q0..q7 about img0..img3.
  rows[0].update(question="Is/Are there a mass?", answer="Yes")
  test = [dict(rows[0], qid=100, question="is there a MASS", answer="yes."),  # All three.
          dict(rows[0], qid=101, question="Is there a mass?", answer="no"),  # Other answer.
          dict(rows[1], qid=102, question="q0?"),  # q0 was asked of img0, not img1.
          dict(rows[2], qid=103, question="what else?")]
  _write(src, rows, test)
  builders.build("vqa_rad", src, tmp_path / "out", max_side=16)
  splits = builders.summary(tmp_path / "out", "vqa_rad")["splits"]
  assert "in_train" not in splits["train"]
  assert splits["test"]["in_train"] == {"images": 3, "questions": 2, "same_answers": 1}


def test_bad_records_are_reported_and_skipped(tmp_path):
  src, rows = _vqa_source(tmp_path)
  rows[3]["image_name"] = "missing.jpg"
  (src / "images" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
  rows[7]["image_name"] = "corrupt.jpg"
  rows[11]["question"] = "  "
  del rows[15]["question"]          # A malformed record.
  rows[20]["qid"] = 19              # A repeated id (TFDS failed on it, naming TensorFlow).
  _write(src, rows, rows[:1])
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "launch/prepare_data.py", "--dataset=vqa_rad",
                        f"--source_dir={src}", f"--data_dir={out}", "--max_bad_fraction=0.05"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  # stdout is the summary alone (a JSON reader of it failed on the build's progress lines).
  summary = json.loads(run.stdout)
  assert "building vqa_rad" in run.stderr
  assert summary["splits"]["train"]["examples"] == 195
  assert summary["splits"]["train"]["skipped"] == 5 and summary["skipped"] == 5
  problems = "\n".join(summary["skipped_examples"])
  assert re.search(r"missing.jpg; \S*trainset.json record 3\): image file not found", problems)
  # Named by its file and its record, without PIL's in-memory buffer.
  assert re.search(r"corrupt.jpg; \S*trainset.json record 7\): unreadable image \(not an "
                   r"image format", problems) and "BytesIO" not in problems
  assert "trainset.json record 11: empty question" in problems
  assert "trainset.json record 15: malformed record (KeyError" in problems
  assert re.search(r"trainset.json record 20: duplicate id '19' \(also \S*trainset.json "
                   r"record 19\)", problems)
  assert "missing.jpg" in run.stderr  # Reported as the build runs, too.


def test_the_limit_on_bad_records_is_stated_as_a_count():
  """11 bad of 1,061 read "(1.0% > the allowed 1.0%)": the message gives the count the limit
  lets through, the same one the check applies (bad / total <= fraction)."""
  for fraction, total in [(0.01, 1061), (0.29, 100), (0.07, 100), (0.0, 50), (1.0, 7),
                          (0.1, 3), (0.15, 20), (0.333, 1000)]:
    n = builders.most_bad(fraction, total)
    assert n / total <= fraction and (n == total or (n + 1) / total > fraction), (fraction, total)
  assert [builders.most_bad(0.01, 1061), builders.most_bad(0.29, 100)] == [10, 29]


def test_too_many_bad_records_fail_and_leave_nothing(tmp_path):
  src, rows = _vqa_source(tmp_path, n=50)
  for i in range(0, 50, 10):
    rows[i]["image_name"] = f"gone{i}.jpg"
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  with pytest.raises(builders.DataError, match=r"(?s)5 of the 50 records of the train split of "
                     r"vqa_rad in \S+ are bad \(10.0%, more than the allowed 1.0%: at most 0\); "
                     r"nothing was built"
                     r".*To build it without them, allow more: launch/prepare_data.py "
                     r"--max_bad_fraction=FRACTION"):
    builders.build("vqa_rad", src, out)
  assert not builders.is_built(out, "vqa_rad")
  assert not list(out.rglob("*.array_record*")) and not list(out.rglob("dataset_info.json"))
  # Corrupt images are only found while writing: the build fails there, and again leaves
  # nothing that reads as a dataset.
  src2, rows2 = _vqa_source(tmp_path / "b", n=50)
  for i in range(5):
    (src2 / "images" / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    rows2[10 * i + 5]["image_name"] = f"bad{i}.jpg"
  _write(src2, rows2, rows2[:2])
  with pytest.raises(builders.DataError, match=r"(?s)1 of the 50 records of the train split .* "
                     r"are bad.*First problems:\n"
                     r"  \d+ \(\S*bad0.jpg; \S*trainset.json record 5\): unreadable image"):
    builders.build("vqa_rad", src2, out)
  assert not builders.is_built(out, "vqa_rad") and not list(out.rglob("*.array_record*"))
  with pytest.raises(FileNotFoundError, match="not built"):
    builders.load(out, "vqa_rad", "train")
  # Every record of a split bad, allowed by the limit that the message suggests raising: a
  # traceback from TFDS ("No examples were yielded") that named no file.
  # Whatever the limit (no limit helps); found when read, or when the images are encoded.
  rows3 = [dict(r, image_name="gone.jpg") for r in rows[:2]]
  _write(src, [r for r in rows if not r["image_name"].startswith("gone")], rows3)
  for limit in (0.01, 1.0):
    with pytest.raises(builders.DataError, match=r"(?s)none of the 2 records of the test split "
                       r"of vqa_rad in \S+ could be used; nothing was built. First problems:\n"
                       r"  \S+ \(\S*gone.jpg; \S*testset.json record 0\): image file not "
                       r"found.*the dataset's reader may be at fault"):
      builders.build("vqa_rad", src, out, max_bad_fraction=limit)
    assert not builders.is_built(out, "vqa_rad") and not list(out.rglob("*.array_record*"))
  _write(src2, [r for r in rows2 if not r["image_name"].startswith("bad")],
         [dict(r, image_name="bad0.jpg") for r in rows2[:2]])
  with pytest.raises(builders.DataError, match=r"none of the 2 records of the test split .*\n"
                     r"  \S+ \(\S*bad0.jpg; \S*testset.json record 0\): unreadable image"):
    builders.build("vqa_rad", src2, out, max_bad_fraction=1.0)
  assert not builders.is_built(out, "vqa_rad") and not list(out.rglob("*.array_record*"))
  # A build that fails into a new data folder leaves no folders behind, however deep it is;
  # into an existing one, it leaves that folder as it was.
  for source in (src2, tmp_path / "no-such-source"):
    with pytest.raises((builders.DataError, FileNotFoundError)):
      builders.build("vqa_rad", source, tmp_path / "new" / "data")
    assert not (tmp_path / "new").exists()
  (tmp_path / "kept").mkdir()
  (tmp_path / "kept" / "notes.txt").write_text("mine")
  with pytest.raises(FileNotFoundError):
    builders.build("vqa_rad", tmp_path / "no-such-source", tmp_path / "kept")
  assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_the_bad_record_limit_holds_for_each_split(tmp_path):
  # 3 of 20 test records bad: 0.7% of the 420 records, 15% of the test split. The limit was
  # counted over the whole dataset, so a build could lose up to a tenth of a test split and
  # succeed, and the test accuracy was over the rest without a word.
  src, rows = _vqa_source(tmp_path, n=420)
  for i in range(400, 403):
    rows[i]["image_name"] = f"gone{i}.jpg"
  _write(src, rows[:400], rows[400:])
  with pytest.raises(builders.DataError, match=r"3 of the 20 records of the test split of "
                     r"vqa_rad .* are bad \(15.0%, more than the allowed 1.0%: at most 0\)"):
    builders.build("vqa_rad", src, tmp_path / "out")
  assert not builders.is_built(tmp_path / "out", "vqa_rad")
  # Allowed (3 of 20 is exactly the limit given), the skipped records are counted with the
  # split, and its metrics say so.
  builders.build("vqa_rad", src, tmp_path / "out", max_bad_fraction=0.15)
  assert builders.summary(tmp_path / "out", "vqa_rad")["splits"]["test"]["skipped"] == 3
  from ml_collections import ConfigDict

  from medvqa_jax.data import splits as splits_lib
  from medvqa_jax.evaluate import vqa
  # Named with its source (as train.py is, which would build a missing dataset at the
  # default limit), the dataset built with the larger allowance is read as it is.
  dc = ConfigDict(dict(name="vqa_rad", dir=str(tmp_path / "out"), source_dir=str(src),
                       train_split="train", val_split="", val_fraction=0.1,
                       test_split="test", max_side=None, closed_set=False))
  got = splits_lib.vqa_splits(dc)
  assert (got["test"].skipped, len(got["test"].records)) == (3, 17)
  assert (got["train"].skipped, got["val"].skipped) == (0, 0)
  metrics = vqa.evaluate([{"prediction": "yes"}] * 17, got["test"], "open-set", 5)
  assert (metrics["skipped_at_build"], metrics["questions"]) == (3, 17)
  assert metrics["overall"] == 1.0
  assert ("warning: 3 records of the test split were skipped as bad when the dataset was "
          "built") in vqa.summary(metrics)
  clean = vqa.evaluate([{"prediction": "yes"}] * len(got["train"].records), got["train"],
                       "open-set", 5)
  assert clean["skipped_at_build"] == 0 and "warning" not in vqa.summary(clean)


def test_a_held_out_slice_names_the_split_its_skipped_records_are_of(tmp_path):
  """A held-out validation slice was warned of as "3 records of the train (held-out 10% of
  images) split were skipped ... these accuracies are over the other 5": the records are the
  whole training split's, some with no image to be in any slice."""
  from ml_collections import ConfigDict

  from medvqa_jax.data import splits as splits_lib
  from medvqa_jax.evaluate import vqa
  src, rows = _vqa_source(tmp_path, n=60)
  _write(src, [dict(r, image_name="gone.jpg") if r["qid"] in (1, 2) else r for r in rows],
         rows[:4])
  builders.build("vqa_rad", src, tmp_path / "out", max_bad_fraction=0.1)
  dc = ConfigDict(dict(name="vqa_rad", dir=str(tmp_path / "out"), source_dir=str(src),
                       train_split="train", val_split="", val_fraction=0.25,
                       test_split="test", max_side=None, closed_set=False))
  got = splits_lib.vqa_splits(dc)
  val = got["val"]
  metrics = vqa.evaluate([{"prediction": "yes"}] * len(val.records), val, "open-set", 5)
  assert (metrics["skipped_at_build"], metrics["skipped_from"]) == (2, "train")
  assert (f"warning: 2 records of the train split were skipped as bad when the dataset was "
          f"built (prepare_data.py's report names them): the train (held-out 25% of images) "
          f"split's {len(val.records)} questions are drawn from the others") in vqa.summary(metrics)
  test = vqa.evaluate([{"prediction": "yes"}] * 4, got["test"], "open-set", 5)
  assert "skipped_from" not in test and "warning" not in vqa.summary(test)


def test_building_twice_is_a_no_op_and_images_can_be_shrunk(tmp_path, capsys):
  src, rows = _vqa_source(tmp_path, n=8)
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  killed = out / "vqa_rad" / "incomplete.ABC123_1.2.0"  # What a killed build leaves.
  killed.mkdir(parents=True)
  (killed / "vqa_rad-train.array_record-00000-of-00001").write_bytes(b"partial")
  folder = builders.build("vqa_rad", src, out, max_side=16)
  assert not killed.exists()
  # The build says what it does (TFDS said "Downloading and preparing dataset Unknown size"),
  # on stderr: stdout is the commands' JSON.
  said = capsys.readouterr()
  assert said.out == ""
  said = said.err
  assert "ownload" not in said
  # (Between the two lines, TFDS's progress bars, on stderr too.)
  assert (f"building vqa_rad from {src} into {out}, images shrunk to a shorter side of at "
          f"most 16 px...\n") in said and f"built vqa_rad in {folder}\n" in said
  stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
  builders.build("vqa_rad", src, out, max_side=16)
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
  assert "building" not in capsys.readouterr().out  # Nothing to build.
  # A build with other options is refused, not silently reused, and the build is untouched.
  for options, differs in (({"max_side": 32}, "max_side 16 (asked: 32)"),
                           ({}, "max_side 16 (asked: 'full size')"),
                           ({"max_side": 16, "splits": ["train"]},
                            "splits 'all' (asked: ['train'])")):
    with pytest.raises(ValueError, match=re.escape(differs)):
      builders.build("vqa_rad", src, out, **options)
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
  ex = builders.load(out, "vqa_rad", "train")[0]
  assert ex["image"].shape == (16, 21, 3)  # 40 x 30: the shorter side shrunk to 16.
  # A negative side built every image at 1 x 1 pixels; refused before anything is made.
  for bad in (-5, 2.5):
    with pytest.raises(ValueError, match=rf"max_side={bad}: the shorter side"):
      builders.build("vqa_rad", src, tmp_path / "negative", max_side=bad)
  assert not (tmp_path / "negative").exists()
  with pytest.raises(ValueError, match=r"max_side=-1: the shorter side"):
    builders.encode_image(b"", -1)
  # A copy of the source elsewhere is the same source; a changed one is refused (it was
  # silently served from the old build).
  import shutil
  copy = shutil.copytree(src, tmp_path / "copy")
  builders.build("vqa_rad", copy, out, max_side=16)
  _write(src, rows + [dict(rows[0], qid=99)], rows[:2])
  with pytest.raises(ValueError, match=r"was built from .*src \(6 files\); .*src now differs "
                     r"\(6 files, or other sizes or annotations"):
    builders.build("vqa_rad", src, out, max_side=16)
  # An edit that keeps the file's size (an answer "yes" -> "no!") is seen too; the sizes
  # alone (builds recorded before contents were) do not see it.
  before = [builders.source_fingerprint(copy, scheme=k)["digest"] for k in (1, 2)]
  text = (copy / "trainset.json").read_text()
  (copy / "trainset.json").write_text(text.replace('"yes"', '"no!"', 1))
  after = [builders.source_fingerprint(copy, scheme=k)["digest"] for k in (1, 2)]
  assert after[0] == before[0] and after[1] != before[1]
  with pytest.raises(ValueError, match=r"copy now differs"):
    builders.build("vqa_rad", copy, out, max_side=16)
  # Training's on-first-use build (data.source_dir set) checks an existing build the same
  # way (it was used as built, whatever the source), and names a source folder that is gone.
  from ml_collections import ConfigDict
  from medvqa_jax.data import splits as splits_lib
  dc = lambda source: ConfigDict(dict(name="vqa_rad", dir=str(out), source_dir=str(source),
                                      max_side=16))
  with pytest.raises(ValueError, match=r"copy now differs"):
    splits_lib.ensure_built(dc(copy))
  with pytest.raises(FileNotFoundError, match=r"source folder .*gone not found \(vqa_rad is "
                     r"built in .* from .*src: to use that build as it is, do not give"):
    splits_lib.ensure_built(dc(tmp_path / "gone"))
  (copy / "trainset.json").write_text(text)
  splits_lib.ensure_built(dc(copy))  # The same source again.
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
  # Datasets built inside their source folder (beside other files) are not part of it: the
  # second build is a no-op, not "the source now differs".
  inner = copy / "tfds"
  inner.mkdir()
  (inner / "notes.txt").write_text("mine")
  folder = builders.build("vqa_rad", copy, inner, max_side=16)
  stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
  builders.build("vqa_rad", copy, inner, max_side=16)
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
  # Built into the source folder itself, or from a source folder named like the dataset
  # into the folder that holds it: the build's outputs (its version folder, downloads/, the
  # lock) fell inside the source, and the second build was refused ("now differs").
  for source, data in ((tmp_path / "same", tmp_path / "same"),
                       (tmp_path / "parent" / "vqa_rad", tmp_path / "parent")):
    shutil.copytree(src, source)
    folder = builders.build("vqa_rad", source, data, max_side=16)
    assert folder.is_relative_to(source)
    stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    builders.build("vqa_rad", source, data, max_side=16)
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    (source / "testset.json").write_text(json.dumps(rows[:3]))  # A real change is still seen.
    with pytest.raises(ValueError, match=r"now differs"):
      builders.build("vqa_rad", source, data, max_side=16)


def test_a_second_build_waits_for_the_one_running(tmp_path, monkeypatch):
  """Runs of a sweep sharing data.dir build on first use at once: the second removed the
  first's incomplete.* folder as left by a killed build, and the first failed. A build now
  holds a lock on the data folder: the second waits, leaves the running one's folder alone,
  then finds the dataset built (or builds it, here, where the "running" build is the test's
  stand-in)."""
  import fcntl
  import threading
  src, rows = _vqa_source(tmp_path, n=8)
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  running = out / "vqa_rad" / "incomplete.RUN123_1.2.0"  # The running build's folder.
  running.mkdir(parents=True)
  waiting = []
  real_flock = fcntl.flock
  monkeypatch.setattr(builders.fcntl, "flock",
                      lambda f, op: (waiting.append(op), real_flock(f, op))[1])
  lock = open(out / ".vqa_rad.build-lock", "a")
  real_flock(lock, fcntl.LOCK_EX)  # The running build holds the lock.
  errors = []
  second = threading.Thread(target=lambda: _catch(errors, builders.build, "vqa_rad", src, out))
  second.start()
  for _ in range(200):
    if waiting:
      break
    second.join(0.05)
  second.join(0.5)
  assert waiting and second.is_alive() and running.exists()  # Waiting, folder untouched.
  real_flock(lock, fcntl.LOCK_UN)
  lock.close()
  second.join(120)
  assert not second.is_alive() and errors == []
  assert builders.is_built(out, "vqa_rad") and not running.exists()
  assert not (out / ".vqa_rad.build-lock").exists()  # The data folder as it was, plus it.


def test_a_waiting_build_holds_the_lock_a_later_one_waits_on(tmp_path):
  """The lock's holder removes its file when done (a build that failed, or was stopped): the
  build waiting on it held a lock on the removed file, a build started then locked a new one,
  and the two ran at once (one removed the other's incomplete.* folder). The waiter takes the
  lock of the file at the path again."""
  import fcntl
  import threading
  path = tmp_path / ".vqa_rad.build-lock"
  holder = open(path, "a")
  fcntl.flock(holder, fcntl.LOCK_EX)
  got = []
  waiter = threading.Thread(target=lambda: got.append(builders._locked(path, "vqa_rad")))
  waiter.start()
  waiter.join(0.5)
  assert waiter.is_alive()  # Waiting for the holder.
  path.unlink()  # The holder is done: its file removed, then its lock released.
  fcntl.flock(holder, fcntl.LOCK_UN)
  holder.close()
  waiter.join(30)
  assert got and path.exists()
  later = open(path, "a")  # A build started now waits for the waiter.
  with pytest.raises(BlockingIOError):
    fcntl.flock(later, fcntl.LOCK_EX | fcntl.LOCK_NB)
  later.close()
  got[0].close()


def _catch(errors, fn, *args):
  try:
    fn(*args)
  except BaseException as e:  # Reported by the test, not lost in the thread.
    errors.append(e)


def test_real_vqa_rad_build_and_summary(tmp_path):
  helpers.shared_data()
  run = subprocess.run([sys.executable, "launch/prepare_data.py", "--dataset=vqa_rad",
                        f"--source_dir={DATA / 'vqa_rad'}", f"--data_dir={tmp_path}",
                        "--max_side=64"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  train, test = summary["splits"]["train"], summary["splits"]["test"]
  assert (train["examples"], test["examples"]) == (3064, 451)
  assert test["answer_type"] == {"CLOSED": 272, "OPEN": 179}
  assert (train["images"], test["images"]) == (314, 203) and summary["skipped"] == 0
  assert test["yes_no_closed"] + test["yes_no_open"] == 451
  # What test shares with training: every image; and 46 questions that the model reads as a
  # training question about the same image, with the same answer ("Is/Are there a rib
  # fracture?", a frame, reads as "is there a rib fracture", a test question).
  assert "in_train" not in train
  assert test["in_train"] == {"images": 203, "questions": 46, "same_answers": 46}
  from medvqa_jax.data import answers
  vocab = builders.answer_vocabulary(tmp_path, "vqa_rad")
  assert vocab[:2] == ["no", "yes"] and len(vocab) == len(set(vocab)) > 300
  train_only = set(vocab)
  test_answers = {answers.normalize(a) for a in _test_answers()}
  assert test_answers - train_only  # Some test answers are unseen: nothing leaked in.
  # The same build with other options (prepare_data's default max_side, 512, as the configs')
  # is refused in one message, exit status 1.
  again = subprocess.run([sys.executable, "launch/prepare_data.py", "--dataset=vqa_rad",
                          f"--source_dir={DATA / 'vqa_rad'}", f"--data_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert again.returncode == 1 and "Traceback" not in again.stderr
  assert again.stderr.startswith(f"error: vqa_rad is already built in {tmp_path}/vqa_rad/1.2.0 "
                                 "with other options: max_side 64 (asked: 512)")
  # Without the frames of test questions: the 284 training questions with a test question's
  # image and answer are left out (refused beside the build with them).
  prepare = lambda out: subprocess.run(
      [sys.executable, "launch/prepare_data.py", "--dataset=vqa_rad", "--notest_frames",
       f"--source_dir={DATA / 'vqa_rad'}", f"--data_dir={out}", "--max_side=64"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  again = prepare(tmp_path)
  assert again.returncode == 1 and "test_frames True (asked: False)" in again.stderr
  run = prepare(tmp_path / "without")
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert (summary["splits"]["train"]["examples"], summary["splits"]["test"]["examples"]) == (
      2780, 451)
  # Without them, one test question is a training question (a test image was in training
  # only through a frame).
  assert summary["splits"]["test"]["in_train"] == {"images": 202, "questions": 1,
                                                   "same_answers": 1}


def _test_answers():
  return [r["answer"] for r in json.loads((DATA / "vqa_rad" / "testset.json").read_text())]


def test_pathvqa_copies_of_one_picture_are_one_image(tmp_path):
  """PathVQA's JSON export stores each question's picture as a file of its own: the 200
  files of the real sample are far fewer pictures. Image ids are digests of the stored image,
  so the summary counts pictures and a held-out validation slice shares none with training
  (by file name, every validation picture was also in training)."""
  import hashlib

  from configs import pathvqa
  from medvqa_jax.data import splits
  source = DATA / "samples" / "pathvqa_hf_json"
  pictures = {hashlib.sha1(p.read_bytes()).digest() for p in source.rglob("*.jpg")}
  builders.build("pathvqa", source, tmp_path)
  assert builders.summary(tmp_path, "pathvqa")["splits"]["test"]["images"] == len(pictures)
  assert len(pictures) < 100
  dc = pathvqa.get_config().data
  dc.update(dir=str(tmp_path), train_split="test")
  # The export has no validation split: the error says how to hold a slice out instead.
  with pytest.raises(ValueError, match="no split 'validation'.*set --config.data.val_split=''"):
    splits.vqa_splits(dc, need=("train", "val"))
  dc.update(val_split="", val_fraction=0.2)
  parts = splits.vqa_splits(dc, need=("train", "val"))
  pixels = lambda split: {hashlib.sha1(np.asarray(split.source[i]["image"]).tobytes()).digest()
                          for i in range(len(split.source))}
  assert len(parts["val"].records) > 0
  assert not pixels(parts["val"]) & pixels(parts["train"])


def test_bad_rows_are_numbered_by_their_place_in_the_file(tmp_path):
  """Readers that take part of a file (VQA-RAD's original release: train and test rows
  interleaved; SLAKE: one language) numbered a bad row by its place among the rows taken."""
  from medvqa_jax.data import sources
  rad = tmp_path / "rad"
  rad.mkdir()
  row = lambda i, phrase: dict(qid=i, image_name="x.jpg", question=f"q{i}?", answer="yes",
                               phrase_type=phrase, answer_type="CLOSED")
  rows = [row(0, "freeform"), row(1, "test_freeform"), row(2, "para"), row(3, "test_para"),
          row(4, "freeform"), row(5, "test_freeform")]
  del rows[4]["question"]
  rows[5]["question"] = " "
  rows.insert(2, "not an object")
  (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
  out = sources.vqa_rad(rad)
  bad = lambda split: [str(b).split("/")[-1] for b in out[split]
                       if isinstance(b, sources.Bad)]
  assert bad("train") == ["VQA_RAD Dataset Public.json record 2: expected an object, got str",
                          "VQA_RAD Dataset Public.json record 5: malformed record "
                          "(KeyError: 'question')"]
  assert bad("test") == ["VQA_RAD Dataset Public.json record 6: empty question"]
  assert [r["id"] for r in out["test"] if isinstance(r, dict)] == ["1", "3"]

  slake = tmp_path / "slake"
  slake.mkdir()
  entry = lambda i, lang: dict(qid=i, img_name="x.jpg", question=f"q{i}", answer="a",
                               q_lang=lang, answer_type="OPEN", content_type="Organ")
  zh = [entry(0, "en"), entry(1, "zh"), entry(2, "en"), entry(3, "zh")]
  del zh[3]["answer"]
  for name in ("train.json", "validate.json", "test.json"):
    (slake / name).write_text(json.dumps(zh))
  (bad_zh,) = [b for b in sources.slake(slake, language="zh")["train"]
               if isinstance(b, sources.Bad)]
  assert str(bad_zh).endswith("train.json record 3: malformed record (KeyError: 'answer')")


def test_text_files_in_other_encodings_and_fields_of_other_types(tmp_path):
  """A byte-order mark (Excel's "CSV UTF-8") is read, not stuck to the first column's name;
  a file that is not UTF-8 is refused naming it; a JSONL field of the wrong type is one bad
  record naming its line, not a crash of the build."""
  from medvqa_jax.data import sources
  roco = tmp_path / "roco"
  (roco / "images").mkdir(parents=True)
  _jpeg(roco / "images" / "r0.jpg", 0)
  (roco / "train.csv").write_bytes("image,caption\nr0.jpg,CT of the chest\n".encode("utf-8-sig"))
  (record,) = sources.roco(roco)["train"]
  assert record["caption"] == "CT of the chest" and Path(record["image"]).exists()
  (roco / "train.csv").write_bytes("image,caption\nr0.jpg,Bézier CT\n".encode("cp1252"))
  with pytest.raises(ValueError, match=r"train.csv: not UTF-8 text \(line 2, byte 22"):
    sources.roco(roco)
  corpus = tmp_path / "jsonl"
  corpus.mkdir()
  _jpeg(corpus / "a.jpg", 1)
  (corpus / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n" +
                                      json.dumps({"image": 7, "caption": "y"}) + "\n")
  good, bad = sources.captions_jsonl(corpus)["train"]
  assert good["caption"] == "x"
  assert str(bad).endswith("train.jsonl line 2: malformed record (TypeError: unsupported "
                           "operand type(s) for /: 'PosixPath' and 'int')")


def test_fields_files_and_csv_rows_of_the_wrong_shape_are_named(tmp_path):
  """A text field holding a list, an object or true/false is a bad record naming the field
  (it was stored as its Python repr); a record file that is no list, a pickle or parquet file
  that cannot be read and a folder in a file's place are errors naming the file; a csv row of
  more fields than its header is a bad record (its caption was cut at the comma), and a quote
  left open an error naming the line (it swallowed the rows after it)."""
  from medvqa_jax.data import sources
  slake = tmp_path / "slake"
  slake.mkdir()
  entry = lambda i, **kw: {**dict(qid=i, img_name="x.jpg", question=f"q{i}", answer="a",
                                  q_lang="en", answer_type="OPEN", content_type="Organ"), **kw}
  rows = [entry(0), entry(1, question=["Is", "there"]), entry(2, answer={"text": "yes"}),
          entry(3, answer=False), entry(4, answer_type=["CLOSED"]), entry(5, qid=None),
          entry(6, answer=[["yes"]]), entry(7, answer=3), entry(8, img_name=None),
          entry(9, img_name=["x.jpg"])]
  for name in ("train.json", "validate.json"):
    (slake / name).write_text(json.dumps(rows))
  (slake / "test.json").write_text("null")
  with pytest.raises(ValueError, match=r"test.json: expected a JSON list of records, got "
                     "NoneType"):
    sources.slake(slake)
  (slake / "test.json").unlink()
  (slake / "test.json").mkdir()
  with pytest.raises(ValueError, match=r"test.json: cannot be read \(Is a directory\)"):
    sources.slake(slake)
  (slake / "test.json").rmdir()
  # Cut short: where, by line and column (the datasets' JSON files are one line each).
  (slake / "test.json").write_text(json.dumps(rows[:1])[:40])
  with pytest.raises(ValueError, match=r"test.json: not valid JSON \(.*, line 1, column \d+\)"):
    sources.slake(slake)
  (slake / "test.json").write_text(json.dumps(rows[:1]))
  train = sources.slake(slake)["train"]
  assert [r["answers"] for r in train if isinstance(r, dict)] == [["a"], ["3"]]
  assert [str(r).split("json record ")[-1] for r in train if isinstance(r, sources.Bad)] == [
      "1: malformed record (TypeError: question: expected text, got list ['Is', 'there'])",
      "2: malformed record (TypeError: answer: expected text, got dict {'text': 'yes'})",
      "3: malformed record (TypeError: answer: expected text, got bool False)",
      "4: malformed record (TypeError: answer type: expected text, got list ['CLOSED'])",
      "5: no id",
      "6: malformed record (TypeError: answer: expected text, got list ['yes'])",
      # A missing image name was a TypeError about PosixPath and NoneType.
      "8: malformed record (ValueError: img_name: no image file name)",
      "9: malformed record (TypeError: img_name: expected text, got list ['x.jpg'])"]

  path = tmp_path / "qas" / "train" / "train_qa.pkl"
  path.parent.mkdir(parents=True)
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"train_qa.pkl: not a readable pickle \(EOFError"):
    sources.pathvqa(tmp_path)
  path.write_bytes(pickle.dumps({"not": "a list"}))
  with pytest.raises(ValueError, match=r"train_qa.pkl: expected a list of records, got dict"):
    sources.pathvqa(tmp_path)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "train.parquet").write_bytes(b"PAR1 not parquet")
  with pytest.raises(ValueError, match=r"train.parquet: not a readable parquet file"):
    sources.pathvqa(tmp_path / "hf")

  roco = tmp_path / "roco"
  (roco / "images").mkdir(parents=True)
  for i in range(3):
    _jpeg(roco / "images" / f"r{i}.jpg", i)
  (roco / "train.csv").write_text("image,caption\nr0.jpg,CT of the chest, with contrast\n"
                                  'r1.jpg,"MRI, T2"\nr2.jpg,X-ray\n')
  cut, quoted, plain = sources.roco(roco)["train"]
  assert str(cut).endswith("train.csv line 2: 3 fields, but the header has 2 (quote a field "
                           "that holds a comma)")
  assert (quoted["caption"], plain["caption"]) == ("MRI, T2", "X-ray")
  # A header without a caption column: each row was an "empty caption", hiding the cause.
  (roco / "train.csv").write_text("id,image,text\n1,r0.jpg,CT chest\n")
  with pytest.raises(ValueError, match=r"train.csv: no caption column \(its header line has "
                     r"id, image, text\)"):
    sources.roco(roco)
  (roco / "train.csv").write_text('image,caption\nr0.jpg,"CT chest\nr1.jpg,MRI\n')
  # Named by the line its row starts on (it named the line before, the header here).
  with pytest.raises(ValueError, match=r"train.csv line 2: not valid csv \(unexpected end of "
                     r"data; a quote opened in it is never closed\)"):
    sources.roco(roco)


def test_several_files_of_one_split_are_refused_naming_them(tmp_path):
  """A caption corpus is one file per split: a second train file (shards, a renamed copy)
  is refused naming both, not read instead of the first (which was silently dropped)."""
  from medvqa_jax.data import sources
  corpus = tmp_path / "jsonl"
  corpus.mkdir()
  _jpeg(corpus / "a.jpg", 1)
  row = json.dumps({"image": "a.jpg", "caption": "x"}) + "\n"
  for name in ("roco_train.jsonl", "train.jsonl", "val.jsonl"):
    (corpus / name).write_text(row)
  with pytest.raises(ValueError, match=r"one \*\.jsonl file per split is read, but "
                     r"roco_train\.jsonl, train\.jsonl are all train files \(join them"):
    sources.captions_jsonl(corpus)
  (corpus / "roco_train.jsonl").unlink()
  assert {k: len(v) for k, v in sources.captions_jsonl(corpus).items()} == {
      "train": 1, "validation": 1}
  # A file named by no split beside the split files was skipped without a word.
  (corpus / "train_part2.jsonl").write_text(row)
  with pytest.raises(ValueError, match=r"train_part2\.jsonl is named by no split and would "
                     r"not be read beside train\.jsonl, val\.jsonl: name each"):
    sources.captions_jsonl(corpus)


def test_text_files_are_read_as_written(tmp_path):
  """Lines end at \\n (or \\r\\n) only: a caption may hold U+2028 or U+0085 raw, which JSON
  allows and str.splitlines broke a line at (two records dropped as "not valid JSON"). A csv
  caption's own CRLF is kept, as in the file."""
  from medvqa_jax.data import sources
  medicat = tmp_path / "medicat"
  (medicat / "figures").mkdir(parents=True)
  captions = ["Axial CT\u2028with contrast", "T2 MRI\x85sagittal", "plain"]
  with open(medicat / "train.jsonl", "w", encoding="utf-8", newline="") as f:
    for i, caption in enumerate(captions):
      f.write(json.dumps({"pdf_hash": f"h{i}", "fig_uri": f"f{i}.jpg", "s2_caption": caption},
                         ensure_ascii=False) + "\r\n")
  got = sources.medicat(medicat)["train"]
  assert [r["caption"] for r in got] == captions
  roco = tmp_path / "roco"
  roco.mkdir()
  (roco / "train.csv").write_bytes(b'id,name,caption\r\nR1,r1.jpg,"line one\r\nline two"\r\n'
                                   b'R2,r2.jpg,plain\r\n')
  got = sources.roco(roco)["train"]
  assert [(r["id"], r["caption"]) for r in got] == [("R1", "line one\r\nline two"),
                                                    ("R2", "plain")]


def test_pathvqa_json_export_named_after_the_hugging_face_splits(tmp_path):
  """An export of the Hugging Face copy names its files after its splits: validation.json
  is the validation split (it was ignored, and the build had none). val.json beside it is
  refused."""
  from medvqa_jax.data import sources
  src = tmp_path / "pathvqa"
  for split in ("train", "validation", "test"):
    rows = [{"image_path": f"images\\{split}\\x{i}.jpg", "question": f"{split} q{i}?",
             "answer": "yes"} for i in range(2)]
    (src / "images" / split).mkdir(parents=True)
    (src / f"{split}.json").write_text(json.dumps(rows))
  # A record's own answer_type, where the export carries one, is kept over the yes/no rule.
  rows = json.loads((src / "test.json").read_text())
  rows[1]["answer_type"] = "open "
  (src / "test.json").write_text(json.dumps(rows))
  out = sources.pathvqa(src)
  assert {s: len(v) for s, v in out.items()} == {"train": 2, "validation": 2, "test": 2}
  assert out["validation"][0]["question"] == "validation q0?"
  assert [r["answer_type"] for r in out["test"]] == ["CLOSED", "OPEN"]
  (src / "val.json").write_text("[]")
  with pytest.raises(ValueError, match="val.json and validation.json are both the validation "
                     "split; keep one"):
    sources.pathvqa(src)


def test_a_null_answer_or_image_path_is_a_bad_record_named_as_such(tmp_path):
  """A null answer (JSON's null, a parquet null) was stored as an empty answer, silently: a
  test question no prediction could answer, counted. It is a bad record now, as NaN is; an
  empty answer as written is kept (SLAKE's training split has one). A null PathVQA
  image_path was "TypeError: expected str, bytes or os.PathLike object"."""
  from medvqa_jax.data import sources
  src = tmp_path / "pathvqa"
  rows = [{"image_path": f"images\\test\\x{i}.jpg", "question": f"q{i}?", "answer": "yes"}
          for i in range(5)]
  rows[1]["answer"], rows[2]["answer"], rows[3]["image_path"] = None, "", None
  rows[4]["answer"] = ["no", None]
  (src / "images" / "test").mkdir(parents=True)
  (src / "test.json").write_text(json.dumps(rows))
  test = sources.pathvqa(src)["test"]
  assert [r["answers"] for r in test if isinstance(r, dict)] == [["yes"], [""]]
  bad = [str(b).split("test.json ")[1] for b in test if isinstance(b, sources.Bad)]
  assert bad == ["record 1: answer: null (a missing value?)",
                 "record 3: malformed record (ValueError: image_path: no image file name)",
                 "record 4: answer: null (a missing value?)"]


def test_a_build_that_predates_recorded_sources_is_used_with_a_warning(tmp_path, caplog):
  """A build made before builds recorded their source folder cannot be checked against the
  one given: it is used as it is (as before), but no longer silently."""
  src, rows = _vqa_source(tmp_path, n=8)
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  folder = builders.build("vqa_rad", src, out, max_side=16)
  builders.build("vqa_rad", src, out, max_side=16)
  assert "before builds recorded" not in caplog.text
  meta = folder / "metadata.json"
  recorded = json.loads(meta.read_text())
  meta.write_text(json.dumps({k: v for k, v in recorded.items() if k != "source"}))
  _write(src, rows[:4], rows[:2])  # Changed since: not seen, the build has nothing to compare.
  with caplog.at_level(logging.WARNING):
    assert builders.build("vqa_rad", src, out, max_side=16) == folder
  assert re.search(r"vqa_rad in .*out.*vqa_rad.* was built before builds recorded their source "
                   r"folder: it is used as it is, unchecked against .*src", caplog.text)


def test_training_reads_only_a_build_with_its_configs_reader_options(tmp_path):
  """A build made with other reader options (prepare_data.py --notest_frames, --language=zh)
  holds other questions: training and evaluation read it only when data.reader_options say
  so (they read whatever was built, and nothing recorded which). A config from before the
  field (a run's saved one) reads the build as it is."""
  from ml_collections import ConfigDict
  from configs import base
  from medvqa_jax.data import splits as splits_lib
  src, rows = _vqa_source(tmp_path, n=8)
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  builders.build("vqa_rad", src, out, max_side=16, reader_options={"test_frames": False})
  dc = lambda **options: ConfigDict(dict(name="vqa_rad", dir=str(out), source_dir=str(src),
                                         max_side=16, **options))
  defaults = base.get_config().data.reader_options.to_dict()
  with pytest.raises(ValueError, match=re.escape(
      "was built with test_frames=False, not data.reader_options' test_frames=True: to read "
      "that build, set --config.data.reader_options.test_frames=False; or build into another "
      "data_dir")):
    splits_lib.ensure_built(dc(reader_options=defaults))
  splits_lib.ensure_built(dc(reader_options={**defaults, "test_frames": False}))
  splits_lib.ensure_built(dc())  # No field: as built.
  # A first build follows the config (SLAKE's language is not VQA-RAD's to take).
  fresh = tmp_path / "fresh"
  splits_lib.ensure_built(ConfigDict(dict(name="vqa_rad", dir=str(fresh), source_dir=str(src),
                                          max_side=16,
                                          reader_options={**defaults, "test_frames": False})))
  assert builders.built_options(fresh, "vqa_rad")["reader_options"] == {"test_frames": False}


def test_prepare_data_builds_the_splits_and_language_asked_for(tmp_path):
  """prepare_data.py --splits builds only the splits named; SLAKE's --language picks the
  questions of that language (q_lang), here the Chinese ones, and the build records it."""
  slake = tmp_path / "slake"
  (slake / "imgs").mkdir(parents=True)
  _jpeg(slake / "imgs" / "x.jpg", 0)
  entry = lambda i, lang: dict(qid=i, img_name="x.jpg", question=f"{lang} q{i}", answer="a",
                               q_lang=lang, answer_type="OPEN", content_type="Organ")
  rows = [entry(0, "en"), entry(1, "zh"), entry(2, "zh"), entry(3, "en"), entry(4, "zh")]
  for name in ("train.json", "validate.json", "test.json"):
    (slake / name).write_text(json.dumps(rows))
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "launch/prepare_data.py", "--dataset=slake",
                        f"--source_dir={slake}", f"--data_dir={out}", "--max_side=0",
                        "--language=zh", "--splits=train,test"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert {s: v["examples"] for s, v in summary["splits"].items()} == {"train": 3, "test": 3}
  assert sorted(ex["question"].decode() for ex in _rows(out, "slake", "test").values()) == [
      "zh q1", "zh q2", "zh q4"]
  assert builders.built_options(out, "slake")["reader_options"] == {"language": "zh"}


def test_a_data_or_source_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
  """mkdir's FileExistsError or PermissionError (a traceback through every command that
  builds) and "does not exist" for a source folder that is a file."""
  src, rows = _vqa_source(tmp_path, n=4)
  _write(src, rows, rows[:1])
  (tmp_path / "notes").write_text("mine")
  with pytest.raises(ValueError, match=r"the data folder .*notes/tfds cannot be made: "
                     r".*notes is a file"):
    builders.build("vqa_rad", src, tmp_path / "notes" / "tfds")
  # A folder that cannot be written (os.access says no: the tests may run as root), and one
  # whose making fails all the same (root on sysfs: "Operation not permitted").
  shut = tmp_path / "shut"
  shut.mkdir()
  with monkeypatch.context() as m:
    helpers.unwritable(m, shut)
    with pytest.raises(ValueError, match=re.escape(
        f"the data folder {shut / 'tfds'} cannot be made: {shut} is a folder not writable "
        "here")):
      builders.build("vqa_rad", src, shut / "tfds")

  def refused(self, *a, **k):
    raise PermissionError(1, "Operation not permitted", str(self))

  with monkeypatch.context() as m:
    m.setattr(Path, "mkdir", refused)
    with pytest.raises(ValueError, match=re.escape(
        f"the data folder {shut / 'tfds'} cannot be made: Operation not permitted "
        f"({shut / 'tfds'})")):
      builders.build("vqa_rad", src, shut / "tfds")
  assert not any(shut.iterdir())
  # The data folder writable, the dataset's folder in it not (another user's build): TFDS's
  # PermissionError was a traceback.
  data = tmp_path / "data"
  (data / "vqa_rad").mkdir(parents=True)
  with monkeypatch.context() as m:
    helpers.unwritable(m, data / "vqa_rad")
    with pytest.raises(ValueError, match=re.escape(
        f"vqa_rad cannot be built in the data folder {data}: {data / 'vqa_rad'} is a folder "
        "not writable here")):
      builders.build("vqa_rad", src, data)
  assert [p.name for p in data.iterdir()] == ["vqa_rad"] and not any((data / "vqa_rad").iterdir())
  with pytest.raises(ValueError, match=r"source folder .*trainset.json is a file, not a "
                     r"folder"):
    builders.build("vqa_rad", src / "trainset.json", tmp_path / "out")
  assert (tmp_path / "notes").read_text() == "mine" and not (tmp_path / "out").exists()


def test_the_configs_reader_options_are_the_readers_defaults():
  """data.reader_options holds every option a reader takes, at the reader's default: the
  configs read what prepare_data.py builds without options."""
  from configs import base
  options = base.get_config().data.reader_options.to_dict()
  readers = {}
  for name in builders.BUILDERS:
    readers.update(builders.build_options(name)["reader_options"])
  assert options == readers == {"language": "en", "test_frames": True}


def test_max_side_bounds_the_shorter_side(tmp_path, caplog):
  """max_side bounded the longer side, so an elongated image (29% of PathVQA's are over
  1.8:1) was stored with a shorter side under the model's input, and every crop of it was
  upsampled. It now bounds the shorter side; a build made under the old rule is refused
  (with the same max_side) or, found by training, used with a warning naming the rule."""
  src, rows = _vqa_source(tmp_path, n=8)
  _jpeg(src / "images" / "img1.jpg", 1, size=(300, 100))
  _jpeg(src / "images" / "img2.jpg", 2, size=(50, 200))
  _write(src, rows, rows[:2])
  assert Image.open(io.BytesIO(builders.encode_image(src / "images" / "img1.jpg", 64))).size \
      == (192, 64)
  # Its shorter side is under 64 already: kept as it is, byte for byte (its longer side over).
  assert builders.encode_image(src / "images" / "img2.jpg", 64) == \
      (src / "images" / "img2.jpg").read_bytes()
  # The longer side is rounded (301 x 64 / 100 = 192.64), not cut.
  _jpeg(tmp_path / "odd.jpg", 3, size=(301, 100))
  assert Image.open(io.BytesIO(builders.encode_image(tmp_path / "odd.jpg", 64))).size == (193, 64)
  # Re-encoded images are stored at JPEG quality 95 (its quantisation tables; PIL's default
  # is 75).
  Image.open(tmp_path / "odd.jpg").save(tmp_path / "odd.png")
  stored = Image.open(io.BytesIO(builders.encode_image(tmp_path / "odd.png", None)))
  at_95 = io.BytesIO()
  Image.open(tmp_path / "odd.png").convert("RGB").save(at_95, "JPEG", quality=95)
  assert stored.format == "JPEG" and stored.quantization == Image.open(at_95).quantization
  out = tmp_path / "out"
  folder = builders.build("vqa_rad", src, out, max_side=64)
  sizes = {ex["image_id"]: ex["image"].shape[:2] for ex in builders.load(out, "vqa_rad", "train")}
  assert sorted(sizes.values()) == [(30, 40), (30, 40), (64, 192), (200, 50)]
  # predict.py and embed.py read an image file as the build stored it.
  stored = {ex["image_id"]: ex["image"] for ex in builders.load(out, "vqa_rad", "train")}
  for i in (1, 2):
    picture = np.asarray(builders.read_as_built(src / "images" / f"img{i}.jpg", 64))
    assert any(np.array_equal(picture, x) for x in stored.values())
  with pytest.raises(ValueError, match=r"nothing.jpg: image file not found"):
    builders.read_as_built(src / "images" / "nothing.jpg", 64)
  meta = folder / "metadata.json"
  recorded = json.loads(meta.read_text())
  assert recorded["build_options"]["shrink"] == "shorter side"
  del recorded["build_options"]["shrink"]  # A build made under the longer-side rule.
  meta.write_text(json.dumps(recorded))
  with pytest.raises(ValueError, match=re.escape(
      "with other options: shrink 'longer side' (asked: 'shorter side')")):
    builders.build("vqa_rad", src, out, max_side=64)
  from ml_collections import ConfigDict
  from medvqa_jax.data import splits as splits_lib
  with caplog.at_level(logging.WARNING):
    splits_lib.ensure_built(ConfigDict(dict(name="vqa_rad", dir=str(out), source_dir="",
                                            max_side=64)))
  assert "built with max_side=64 (longer side), not data.max_side=64 (shorter side)" in caplog.text
  # Read as built, the config says so: the run records the build's max_side, which
  # predict.py shrinks an image file to (it took the config's, and showed the model another
  # image than eval.py did).
  dc = ConfigDict(dict(name="vqa_rad", dir=str(out), source_dir="", max_side=512))
  splits_lib.ensure_built(dc)
  assert dc.max_side == 64


def test_grey_pictures_are_stored_as_one_band_with_the_pixels_of_their_rgb_jpeg(tmp_path):
  """A grey picture (three equal bands: most radiology) was stored as a three-band JPEG. It is
  stored as its one band, which decodes to exactly the pixels the three-band JPEG gave (at
  the quality builds use, and pack.py's 90), in half the time; colour stays RGB. A grey
  JPEG that needs no shrinking is kept byte for byte, as an RGB one is (it was re-encoded)."""
  rng = np.random.default_rng(0)
  for k, (h, w) in enumerate([(37, 53), (64, 48), (130, 201), (17, 16)]):
    yy, xx = np.mgrid[0:h, 0:w]
    grey = np.clip(127 + 90 * np.sin(xx / 7 + k) * np.cos(yy / 5)
                   + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
    for mode, picture in (("L", grey), ("RGB", np.repeat(grey[..., None], 3, -1))):
      Image.fromarray(picture, mode).save(tmp_path / "scan.png")
      for max_side, quality in ((None, 95), (16, 95), (None, 90)):
        stored = builders.encode_image(tmp_path / "scan.png", max_side, quality=quality)
        got = Image.open(io.BytesIO(stored))
        assert got.format == "JPEG" and got.mode == "L", (h, w, mode, max_side)
        # What the build stored before: the RGB picture, shrunk alike, as an RGB JPEG.
        rgb = Image.fromarray(np.repeat(grey[..., None], 3, -1), "RGB")
        if max_side and min(rgb.size) > max_side:
          scale = max_side / min(rgb.size)
          rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                           Image.Resampling.BICUBIC)
        before = io.BytesIO()
        rgb.save(before, "JPEG", quality=quality)
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), _decoded(before.getvalue()))
        # The pipeline augments both as the same one band.
        np.testing.assert_array_equal(np.asarray(augment.image(stored)),
                                      np.asarray(augment.image(before.getvalue())))
  colour = np.stack([grey, grey, 255 - grey], -1)
  Image.fromarray(colour).save(tmp_path / "colour.png")
  assert Image.open(io.BytesIO(builders.encode_image(tmp_path / "colour.png", None))).mode == "RGB"
  # Nearly grey is colour: one pixel's blue off by one.
  colour = np.repeat(grey[..., None], 3, -1)
  colour[5, 7, 2] ^= 1
  Image.fromarray(colour).save(tmp_path / "almost.png")
  assert Image.open(io.BytesIO(builders.encode_image(tmp_path / "almost.png", None))).mode == "RGB"
  Image.fromarray(grey, "L").save(tmp_path / "grey.jpg", quality=80)
  assert builders.encode_image(tmp_path / "grey.jpg", None) == (tmp_path / "grey.jpg").read_bytes()
  assert Image.open(io.BytesIO(builders.encode_image(tmp_path / "grey.jpg", 8))).mode == "L"
  # A build stores them so, and its decoded examples are still (H, W, 3).
  src, rows = _vqa_source(tmp_path, n=8)
  Image.fromarray(grey, "L").save(src / "images" / "img1.jpg", quality=80)
  Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(src / "images" / "img2.png")
  for row in rows:
    row["image_name"] = row["image_name"].replace("img2.jpg", "img2.png")
  _write(src, rows, rows[:2])
  out = tmp_path / "out"
  builders.build("vqa_rad", src, out, max_side=0)
  raw = {_text(ex["image_id"]): ex["image"]
         for ex in builders.load(out, "vqa_rad", "train", decode_images=False)}
  assert {k: Image.open(io.BytesIO(v)).mode for k, v in raw.items()} == {
      "img0.jpg": "RGB", "img1.jpg": "L", "img2.png": "L", "img3.jpg": "RGB"}
  for ex in builders.load(out, "vqa_rad", "train"):
    name = _text(ex["image_id"])
    np.testing.assert_array_equal(ex["image"], _decoded(raw[name]))
    assert ex["image"].shape[2] == 3


def test_fields_that_decide_a_split_or_language_are_read_or_named(tmp_path):
  """VQA-RAD's phrase_type decides its split: a test question was trained on when the field
  was missing, null or written otherwise ("Test_para"). SLAKE's q_lang decides the language:
  a question without one was dropped unseen. JSON's NaN (pandas' missing value) was stored
  as the text "nan". A picture named two ways ("./a.jpg") had two image ids. Each is read,
  or named as a bad record."""
  src, rows = _vqa_source(tmp_path, n=8)
  for r, phrase in zip(rows, ("freeform", "test_freeform", "Test_para", " test_freeform",
                              None, "", "para", "test_para")):
    r["phrase_type"] = phrase
  del rows[5]["phrase_type"]
  rows[0].update(question_frame="is/are there q0?")
  rows[3].update(qid=None, question_frame="a frame")
  rows[6]["answer"] = float("nan")
  rows[2]["image_name"] = "./img2.jpg"
  original = src / "VQA_RAD Dataset Public.json"
  (src / "images").rename(src / "VQA_RAD Image Folder")
  original.write_text(json.dumps(rows))
  assert "NaN" in original.read_text()
  out = sources.vqa_rad(src)
  good = lambda split: sorted(r["id"] for r in out[split] if isinstance(r, dict))
  bad = lambda split: [str(b) for b in out[split] if isinstance(b, sources.Bad)]
  assert good("test") == ["1", "2", "7"]  # Test_para and " test_freeform" are test.
  assert good("train") == ["0", "0-frame"]
  problems = "\n".join(bad("train") + bad("test"))
  assert "record 3: no id" in problems and "record 3: malformed record (ValueError: qid: " \
      "missing, so its question_frame has no id)" in problems  # Not a frame "None-frame".
  for n in (4, 5):
    assert (f"record {n}: malformed record (ValueError: phrase_type: missing, so its split "
            "is unknown") in problems
  assert "record 6: malformed record (ValueError: answer: nan (a missing value?))" in problems
  image_ids = {r["id"]: r["image_id"] for r in out["test"] if isinstance(r, dict)}
  assert image_ids["2"] == "img2.jpg"  # As "img2.jpg" elsewhere: one picture, one id.

  slake = tmp_path / "slake"
  (slake / "imgs").mkdir(parents=True)
  _jpeg(slake / "imgs" / "x.jpg", 0)
  entry = lambda i, **kw: dict(dict(qid=i, img_name="x.jpg", question=f"q{i}", answer="a",
                                    q_lang="en", answer_type="OPEN", content_type="Organ"),
                               **kw)
  rows = [entry(0), entry(1, q_lang="zh"), entry(2, q_lang=None), entry(3, q_lang="en "),
          entry(4, q_lang="EN"), entry(5)]
  del rows[5]["q_lang"]
  for name in ("train.json", "validate.json", "test.json"):
    (slake / name).write_text(json.dumps(rows))
  test = sources.slake(slake)["test"]
  assert sorted(r["id"] for r in test if isinstance(r, dict)) == ["0", "3", "4"]
  assert [str(b).split("test.json ")[1] for b in test if isinstance(b, sources.Bad)] == [
      f"record {n}: malformed record (ValueError: q_lang: missing, so the question's "
      "language is unknown)" for n in (2, 5)]
  # An empty split: TFDS's "No examples were yielded" naming no file.
  (slake / "test.json").write_text("[]")
  with pytest.raises(builders.DataError, match=r"the test split\(s\) of slake in \S+slake "
                     r"have no records: is the split's file empty"):
    builders.build("slake", slake, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_multi_view_lists_pair_by_place_and_an_image_too_long_for_jpeg_is_skipped(tmp_path):
  """A final ";" ends a study's image or view list; an empty entry inside one, or a view type
  missing ("PA;" for two images: its second view stored with view ''), is a bad record. An
  image longer than JPEG's 65,500 pixels crashed the build ("broken data stream")."""
  mimic = tmp_path / "mimic"
  (mimic / "files").mkdir(parents=True)
  for i in range(3):
    _jpeg(mimic / "files" / f"{i}.jpg", i)
  with open(mimic / "train.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["study_id", "images", "views", "report"])
    w.writerow(["s0", "files/0.jpg;files/1.jpg;", "PA;LATERAL;", "ok"])
    w.writerow(["s1", "files/0.jpg;files/1.jpg", "PA;", "views short"])
    w.writerow(["s2", "files/0.jpg;;files/2.jpg", "PA;PA;LATERAL", "an empty image"])
    w.writerow(["s3", "files/0.jpg;files/2.jpg", "PA;PA", "two of one view"])
    w.writerow(["s4", "files/1.jpg", "AP", "one image"])
  out = sources.mimic_multiview(mimic)["train"]
  assert out[0]["view2"] == "LATERAL" and out[0]["image2"].endswith("1.jpg")
  # No other view: the second image (of the same view), or the one image twice.
  assert out[3]["image2"].endswith("2.jpg") and out[3]["view2"] == "PA"
  assert out[4]["image2"] == out[4]["image"] and out[4]["image"].endswith("1.jpg")
  assert str(out[1]).endswith("line 3: 2 images but 1 view types")
  assert str(out[2]).endswith("line 4: empty images entry 2")
  wide = tmp_path / "wide.png"
  Image.fromarray(np.zeros((4, 66000), np.uint8)).save(wide)
  with pytest.raises(ValueError, match=r"66000 x 4 pixels: a side over JPEG's 65,500"):
    builders.encode_image(wide, 512)


def test_images_outside_the_source_folder_are_warned_of(tmp_path, caplog):
  """Absolute and ../ image paths are read, but the source fingerprint covers the folder's
  own files: a later change to them would not be seen, so the build says so."""
  corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
  corpus.mkdir(), elsewhere.mkdir()
  _jpeg(corpus / "in.jpg", 0), _jpeg(elsewhere / "out.jpg", 1)
  lines = [{"image": "in.jpg", "caption": "inside"},
           {"image": str(elsewhere / "out.jpg"), "caption": "absolute"},
           {"image": "../elsewhere/out.jpg", "caption": "relative"}]
  (corpus / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  with caplog.at_level(logging.WARNING):
    builders.build("captions_jsonl", corpus, tmp_path / "out")
  (warning,) = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
  assert warning.startswith(f"2 image files of captions_jsonl lie outside its source folder "
                            f"{corpus} (e.g. {elsewhere / 'out.jpg'}): they are read")
  caplog.clear()
  (corpus / "train.jsonl").write_text(json.dumps(lines[0]) + "\n")
  with caplog.at_level(logging.WARNING):
    builders.build("captions_jsonl", corpus, tmp_path / "out2")
  assert not [r for r in caplog.records if "outside" in r.getMessage()]
