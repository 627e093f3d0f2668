"""Answer normalisation, matching, vocabulary and the validation slice."""

import random

import pytest

from medvqa_jax.data import answers


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"), ("the left lung", "left lung"), ("An X-ray", "xray"), ("x-rays", "xrays"),
    ("chest x Ray", "chest xray"), ("box ray", "box ray"),
    ("Yes.", "yes"), ("MRI - T2 weighted", "mri t2 weighted"), ("3.5 cm", "3.5 cm"),
    ("right-sided", "right sided"), ("  NO ", "no"), ("none", "0"), ("(a) mass", "mass"),
    ("Chest X - ray", "chest xray"), ("x_ray", "xray"), ("(x)-ray", "xray"), ("x  ray", "xray"),
    # The VQA toolkit's rule: a text with a punctuation mark next to a space loses its marks
    # (a comma between words with no space joins them, as the toolkit's does), else each
    # mark becomes a space.
    ("RUQ pain, jaundice,weight loss?", "ruq pain jaundiceweight loss"),
    ("t1/t2", "t1 t2"), ("mass, left", "mass left"), ("Ten cm", "10 cm"),
    # Typographic quotes as the straight ones (text copied from a paper or a word processor).
    ("patient\u2019s left", "patient s left"), ("patient's left", "patient s left"),
    ("\u201cmass\u201d", "mass"), ("\u2018left\u2019 lung", "left lung"),
    # The toolkit's period rule: every period not before a digit goes (its look-behind is
    # misspelt as a look-ahead, so after a digit too), one inside a number stays.
    ("5.", "5"), ("Grade 2.", "grade 2"), ("2.5.", "2.5"),
    # "#" (a reference's separator) is punctuation.
    ("ct#mri", "ct mri"),
])
def test_normalize(raw, expected):
  assert answers.normalize(raw) == expected


def test_normalizing_twice_changes_nothing():
  # A prediction is a vocabulary entry (normalised once) and is normalised again when scored:
  # were normalize not idempotent, a right answer could score as wrong.
  rng = random.Random(0)
  alphabet = "xXrRaAyY -_/()., ?'\u2019\u201c#1tThe"
  for _ in range(20_000):
    raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
    once = answers.normalize(raw)
    assert answers.normalize(once) == once, raw
  vocab = answers.vocabulary(["Chest X - ray", "x/ray"])
  assert vocab == ["chest xray", "xray"]
  assert answers.is_correct(vocab[0], "Chest X - ray") and answers.is_correct(vocab[1], "X-ray")


def test_alternatives_and_matching():
  ref = "face, sinuses, and neck#skull and contents"
  assert answers.alternatives(ref) == ["face sinuses and neck", "skull and contents"]
  assert answers.is_correct("Skull and contents", ref)
  assert answers.is_correct("face, sinuses and neck", ref)
  assert not answers.is_correct("skull", ref)
  assert answers.is_correct("the X-ray", ["xray"])
  assert answers.is_correct("ct mri", ["ct#mri"])  # A list's answers are taken whole.
  # An empty alternative ("yes#", a blank list entry) is none: nothing matches it.
  assert answers.alternatives("yes#") == ["yes"] == answers.alternatives(["yes", " "])
  assert not answers.is_correct("?", "yes#") and not answers.is_correct("", ["yes", " "])


def test_yes_no_and_answer_type():
  assert answers.is_yes_no("Yes") and answers.is_yes_no(["no"]) and not answers.is_yes_no("left")
  assert answers.is_yes_no(["yes", "No."]) and not answers.is_yes_no(["yes", "present"])
  assert not answers.is_yes_no([])
  assert answers.is_yes_no("yes#") and answers.is_yes_no(["no", ""])  # Empty ones left out.
  assert answers.answer_type("CLOSED ") == "CLOSED" and answers.answer_type(None) == ""


def test_vocabulary_from_training_answers():
  vocab = answers.vocabulary(["Yes", "yes", "No", "two", "2", "left", "", "The left"])
  assert vocab == ["2", "left", "yes", "no"]
  assert answers.vocabulary(["a b", "c", "c"], min_count=2) == ["c"]
  # Answers that normalise to nothing are not a class (nor a candidate the model could pick).
  assert answers.vocabulary(["the", "?", "yes", " "]) == ["yes"]


def test_validation_slice_is_fixed_and_holds_out_whole_images():
  ids = [f"q{i}" for i in range(100)]
  images = [f"img{i // 4}" for i in range(100)]
  a = answers.validation_slice(ids, 0.2, seed=3, groups=images)
  assert a == answers.validation_slice(ids, 0.2, seed=3, groups=images)
  assert a != answers.validation_slice(ids, 0.2, seed=4, groups=images)
  held_images = {images[ids.index(i)] for i in a}
  assert len(held_images) == 5 and len(a) == 20
  assert all(i in a for i, img in zip(ids, images) if img in held_images)
  assert answers.validation_slice(ids, 0.0, seed=3, groups=images) == set()  # Not one image.
  # The number of images held out is the fraction's, rounded: 3.5 of 35 is 4, 0.35 is 1.
  ids = [f"q{i}" for i in range(70)]
  images = [f"img{i // 2}" for i in range(70)]
  for fraction, held in ((0.1, 4), (0.01, 1), (0.13, 5)):
    a = answers.validation_slice(ids, fraction, seed=0, groups=images)
    assert len({images[ids.index(i)] for i in a}) == held, fraction


def test_validation_slice_is_the_same_in_every_process_and_for_any_record_order():
  """The slice is chosen again by every command that reads the run's data (train.py, then
  eval.py): it must not hang on the process's string hashing (PYTHONHASHSEED) or on the
  order the records come in, or validation would hold images another process trained on."""
  import os
  import subprocess
  import sys
  code = ("from medvqa_jax.data import answers; ids = [f'q{i}' for i in range(200)]; "
          "print(sorted(answers.validation_slice(ids, 0.1, 0, [f'img{i // 2}.jpg' for i in "
          "range(200)])))")
  slices = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed},
                           timeout=120, check=True).stdout for seed in ("1", "2", "3")}
  assert len(slices) == 1
  ids = [f"q{i}" for i in range(200)]
  images = [f"img{i // 2}.jpg" for i in range(200)]
  assert answers.validation_slice(ids[::-1], 0.1, 0, images[::-1]) == \
      answers.validation_slice(ids, 0.1, 0, images)


def test_a_dataset_without_validation_split_needs_a_held_out_fraction(tmp_path):
  from ml_collections import ConfigDict

  from medvqa_jax.data import splits
  dc = ConfigDict(dict(name="vqa_rad", dir=str(tmp_path), source_dir="", max_side=None,
                       train_split="train", val_split="", test_split="test", val_fraction=0.0))
  with pytest.raises(ValueError, match=r"data.val_fraction must be > 0 \(it is 0.0\)"):
    splits.vqa_splits(dc)
  assert not list(tmp_path.iterdir())  # Refused before building anything.


def test_one_split_in_two_roles_is_refused_by_its_flags(tmp_path):
  """--config.data.val_split=test (VQA-RAD has no validation split) chose the checkpoint on
  test and drew the answers (vocabulary, GCA prior, candidates) from it, labelled open-set."""
  from ml_collections import ConfigDict

  from medvqa_jax.data import splits
  dc = ConfigDict(dict(name="vqa_rad", dir=str(tmp_path), source_dir="", max_side=None,
                       train_split="train", val_split="test", test_split="test",
                       val_fraction=0.1))
  with pytest.raises(ValueError, match=r"^--config.data.val_split and --config.data.test_split "
                     r"are both 'test': the val and test splits must differ"):
    splits.vqa_splits(dc)
  dc.update(val_split="", train_split="test")
  with pytest.raises(ValueError, match=r"^--config.data.train_split and --config.data."
                     r"test_split are both 'test'"):
    splits.vqa_splits(dc)
  dc.update(val_split="train", train_split="train", test_split="validation")
  with pytest.raises(ValueError, match=r"^--config.data.train_split and --config.data.val_split"):
    splits.vqa_splits(dc)
  assert not list(tmp_path.iterdir())  # Refused before building anything.


def test_a_dataset_of_the_other_kind_is_refused_by_name(tmp_path):
  """A fine-tuning run on a caption corpus, or a pre-training run on a VQA dataset, is refused
  naming the dataset, its kind and the datasets that fit, before anything is built."""
  from ml_collections import ConfigDict

  from medvqa_jax.data import builders, splits
  assert [builders.kind(n) for n in ("vqa_rad", "pathvqa", "roco", "mimic_cxr")] == [
      "vqa", "vqa", "caption", "caption"]
  dc = lambda name: ConfigDict(dict(
      name=name, dir=str(tmp_path), source_dir=str(tmp_path / "download"), max_side=None,
      train_split="train", val_split="", test_split="test", val_fraction=0.1))
  with pytest.raises(ValueError, match=r"^--config.data.name=roco is a caption corpus, but "
                     r"this config runs fine-tuning \(model.head is not 'none'\), which reads "
                     r"a VQA dataset \(pathvqa, slake, vqa_med_2019, vqa_rad\): pre-train on"):
    splits.vqa_splits(dc("roco"))
  with pytest.raises(ValueError, match=r"^--config.data.name=slake is a VQA dataset, but this "
                     r"config runs pre-training .* \(captions_jsonl, medicat, mimic_cxr, roco\): "
                     r"fine-tune on it with configs/slake.py$"):
    splits.caption_splits(dc("slake"))
  with pytest.raises(ValueError, match=r"^--config.data.name: unknown dataset 'vqarad'; "
                     r"expected one of \['captions_jsonl', "):
    splits.vqa_splits(dc("vqarad"))
  assert not list(tmp_path.iterdir())


def test_the_configs_answer_length_holds_the_real_answers():
  """No answer of VQA-RAD or SLAKE (train and test) is cut by the generative head's
  answer_max_len: the longest take 27 and 30 word pieces with [CLS] and [SEP]."""
  import json
  from pathlib import Path

  from configs import base
  from medvqa_jax import ASSETS
  from medvqa_jax.data.tokenizer import load_hf_tokenizer
  data = Path(__file__).resolve().parents[3] / "shared" / "data"
  tok = load_hf_tokenizer(ASSETS / "bert_uncased_vocab")
  found = []
  for files in (["vqa_rad/trainset.json", "vqa_rad/testset.json"],
                ["slake/Slake1.0/train.json", "slake/Slake1.0/test.json"]):
    rows = [r for f in files for r in json.loads((data / f).read_text())
            if r.get("q_lang", "en") == "en"]
    found.append(sorted({answers.normalize(r["answer"]) for r in rows}))
  max_len = base.get_config().model.answer_max_len
  assert [answers.longer_than(a, tok, max_len) for a in found] == [[], []]
  # What it names when a length cuts: VQA-RAD's longest answers at the old 16.
  cut = answers.longer_than(found[0], tok, 16)
  assert len(cut) == 9 and all(len(tok(a)["input_ids"]) > 16 for a in cut)
  assert answers.longer_than([], tok, 4) == []
