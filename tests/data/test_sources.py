"""The readers on the real data in ../shared/data."""

import shutil
from collections import Counter
from pathlib import Path

import pytest

import helpers
from medvqa_jax.data import sources

DATA = helpers.SHARED_DATA


@pytest.fixture(autouse=True)
def _real_data():
  helpers.shared_data()


def _good(items):
  return [r for r in items if isinstance(r, dict)]


def test_an_image_named_two_ways_is_one_picture():
  """An annotation's image name, as the held-out slice groups by it: Windows separators and a
  leading "./" name the same picture (under two ids it could fall on both sides)."""
  assert sources._image_key("x\\a.jpg") == sources._image_key("./x/a.jpg") == \
      sources._image_key(" x//a.jpg ") == "x/a.jpg"


def test_vqa_rad_mevf_split():
  out = sources.vqa_rad(DATA / "vqa_rad")
  train, test = _good(out["train"]), _good(out["test"])
  assert (len(train), len(test)) == (3064, 451)
  assert Counter(r["answer_type"] for r in test) == {"CLOSED": 272, "OPEN": 179}
  assert len({r["id"] for r in train + test}) == 3515  # Ids are unique across splits.
  assert all(Path(r["image"]).exists() for r in train[:50])
  # The question types as annotated, their variants made one: the release also has "Other",
  # "ATRIB", "PRSE" (training split) and both orders of a question's two types.
  kinds = {"ABN", "ATTRIB", "COLOR", "COUNT", "MODALITY", "ORGAN", "OTHER", "PLANE", "POS",
           "PRES", "SIZE"}
  types = Counter(r["question_type"] for r in train + test)
  assert {t for t in types if ", " not in t} == kinds
  pairs = [t.split(", ") for t in types if ", " in t]
  assert pairs and all(p == sorted(p) and set(p) <= kinds for p in pairs), pairs
  assert types["OTHER"] == 169 + 2 + 26 and types["PRES"] == 1214 + 2 + 163
  assert types["POS, PRES"] == 6 + 5 + 2 + 1


def test_slake_english():
  out = sources.slake(DATA / "slake")
  counts = {s: len(_good(v)) for s, v in out.items()}
  assert counts == {"train": 4919, "validation": 1053, "test": 1061}
  assert {r["answer_type"] for r in _good(out["test"])} == {"OPEN", "CLOSED"}
  assert all(r["question_type"] for r in _good(out["train"]))
  assert len(_good(sources.slake(DATA / "slake", language="zh")["train"])) == 9835 - 4919
  # A language the files do not hold was "no records found in ..." from the build.
  with pytest.raises(ValueError, match=r"no SLAKE question is in the language 'fr' "
                                       r"\(--language, the records' q_lang\); they are in "
                                       r"'en', 'zh'"):
    sources.slake(DATA / "slake", language="fr")
  images = lambda s: {r["image_id"] for r in _good(out[s])}
  assert not images("train") & images("test")  # SLAKE's splits have disjoint images.
  # An image id is the picture's (the questions of one picture share it: a held-out slice
  # holds whole pictures), not the question's.
  by_file = {}
  for r in _good(out["train"]):
    by_file.setdefault(Path(r["image"]).parent.name, set()).add(r["image_id"])
  assert all(len(ids) == 1 for ids in by_file.values())
  assert len(images("train")) == len(by_file) < len(_good(out["train"])) / 5


def test_pathvqa_json_export():
  out = sources.pathvqa(DATA / "samples" / "pathvqa_hf_json")
  test = _good(out["test"])
  assert len(test) == 200 and set(out) == {"test"}
  assert all(Path(r["image"]).exists() for r in test)  # "images\\test\\x.jpg" resolved.


def test_vqa_med_2019():
  out = sources.vqa_med_2019(DATA / "samples" / "vqa_med_2019")
  val = _good(out["validation"])
  assert len(val) == 100 and len({r["image_id"] for r in val}) == 25
  assert Counter(r["question_type"] for r in val) == {
      "modality": 25, "plane": 25, "organ": 25, "abnormality": 25}
  test = _good(out["test"])
  assert len(test) == 500
  # Each record says where it is (a problem with its image names the line).
  assert val[2]["where"].endswith("All_QA_Pairs_val.txt line 3")
  assert test[4]["where"].endswith("VQAMed2019_Test_Questions_w_Ref_Answers.txt line 5")
  assert Counter(r["question_type"] for r in test) == {
      "modality": 125, "plane": 125, "organ": 125, "abnormality": 125}
  # Ids are unique across splits (both files number their lines from 1).
  assert len({r["id"] for r in val + test}) == 600
  # The 12 references with "#"-separated alternatives and the 20 with an optional "(...)"
  # part (the test set's README: either form is correct).
  multi = [r for r in test if "(" not in r["answers"][0] and len(r["answers"]) > 1]
  assert len(multi) == 12
  first = next(r for r in test if r["image_id"] == "synpic40410")
  assert first["answers"] == ["face, sinuses, and neck", "skull and contents"]
  optional = [r["answers"] for r in test if "(" in r["answers"][0]]
  assert len(optional) == 20 and all(len(a) == 2 for a in optional)
  assert ["ct w/contrast (iv)", "ct w/contrast"] in optional
  assert ["(angioinvasive aspergillosis with) septic cerebral emboli",
          "septic cerebral emboli"] in optional
  assert ["glioblastoma multiforme (gbm, astrocytoma grade 4/iv)",
          "glioblastoma multiforme"] in optional
  from medvqa_jax.data import answers
  assert answers.is_correct("ct w/contrast", ["ct w/contrast (iv)", "ct w/contrast"])
  assert not answers.is_correct("ct w/contrast", ["ct w/contrast (iv)"])  # Was wrong.
  assert answers.is_correct("CT w/contrast (IV)", ["ct w/contrast (iv)", "ct w/contrast"])
  # An answer all in parentheses keeps only its full form; repeats are left out.
  assert sources.with_optional_parts(["a (b)", "c", "(d) e", "(f)", "a"]) == [
      "a (b)", "a", "c", "(d) e", "e", "(f)"]


def test_a_bad_record_made_without_its_place_is_named_by_it(tmp_path):
  """A reader's `make` may leave `_vqa`'s `where` out: its bad records named no file."""
  path = tmp_path / "train.json"
  rows = [{"q": "  "}, {"q": "is it?"}]
  got = sources._records(path, rows,
                         lambda r, where: sources._vqa("x", "a.png", "a", r["q"], "yes"))
  assert str(got[0]) == f"{path} record 0: empty question"
  assert got[1]["where"] == f"{path} record 1"


def test_vqa_med_pairs_in_no_category_file_are_warned_of(tmp_path, caplog):
  # A pair's category was found only by an exact match of its line with the category file's:
  # spacing apart, or a pair in no category file, left the category empty without a word.
  src = DATA / "samples" / "vqa_med_2019" / "ImageClef-2019-VQA-Med-Validation"
  base = tmp_path / src.name
  shutil.copytree(src / "QAPairsByCategory", base / "QAPairsByCategory")
  lines = (src / "All_QA_Pairs_val.txt").read_text().splitlines()
  image_id, question, answer = lines[0].split("|")
  lines[0] = f"{image_id}|  {question.replace(' ', '  ')} |{answer}"
  lines.append("synpic00000|what is shown?|nothing#no finding")  # Two accepted answers.
  (base / "All_QA_Pairs_val.txt").write_text("\n".join(lines) + "\n")
  with caplog.at_level("WARNING"):
    val = sources.vqa_med_2019(tmp_path)["validation"]
  assert len(val) == 101 and val[0]["question_type"] == "modality"
  assert [r["question_type"] for r in val].count("") == 1 and val[-1]["question_type"] == ""
  assert val[-1]["answers"] == ["nothing", "no finding"]
  assert ("1 of the validation questions in All_QA_Pairs_val.txt are in none of the category "
          "files of") in caplog.text
  assert "All_QA_Pairs_val.txt line 101): their category is left empty" in caplog.text


def test_vqa_med_test_categories_are_read_in_lower_case_and_ids_are_unique(tmp_path):
  """The test file's category column is the protocol's per-category key: "Modality" and
  " plane " are the categories the training files' names give ("modality", "plane"). Each
  split's file numbers its lines from 1: the ids name the split too."""
  folder = tmp_path / sources._VQAMED_TEST[0]
  folder.mkdir()
  (folder / sources._VQAMED_TEST[1]).write_text("synpic1|Modality|what modality?|ct\n"
                                                "synpic2| Plane |which plane?|axial\n")
  for split_folder, qa_name, _ in sources._VQAMED_SPLITS.values():
    (tmp_path / split_folder).mkdir()
    (tmp_path / split_folder / qa_name).write_text("synpic3|what organ?|lung\n")
  out = sources.vqa_med_2019(tmp_path)
  test = out["test"]
  assert [r["question_type"] for r in test] == ["modality", "plane"]
  ids = [r["id"] for split in ("train", "validation", "test") for r in out[split]]
  assert len(ids) == 4 and len(set(ids)) == 4, ids
