"""Question and caption clean-up (medvqa_jax/data/text.py), as the reference code's, and that
the pipeline feeds it to the model (and the teacher) rather than the raw text."""

import numpy as np
import pytest
from PIL import Image

from medvqa_jax import ASSETS
from medvqa_jax.data import pipeline
from medvqa_jax.data import text
from medvqa_jax.data import tokenizer as tokenizer_lib


@pytest.mark.parametrize("raw, clean", [
    ("Is there a Pneumothorax?", "is there a pneumothorax"),
    ("Is/Are the lungs (both) clear?", "is the lungs both clear"),
    ("Where is the mass, near/in the liver?", "where is the mass in the liver"),
    ("Is the lesion > 5 cm?", "is the lesion more than  5 cm"),
    ("Is this an X-ray -yes/no", "is this an xray"),
    ("what's seen on the x ray: \"left\"; ~ok", "whats seen on the xray left ok"),
    ("  trailing spaces   ", "  trailing spaces"),
    ("Is the patient’s “left” lung clear?", "is the patients left lung clear"),
])
def test_questions(raw, clean):
  assert text.question(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("Chest X-ray: no acute findings.", "chest x ray no acute findings"),
    ("T2/FLAIR image_of <PERSON>'s  brain  ", "t2 flair imageof persons brain"),
    ("CT (axial) -- 5 mm slices!", "ct axial 5 mm slices"),
    ("The patient’s ‘typical’ “signs”", "the patients typical signs"),
])
def test_captions(raw, clean):
  assert text.caption(raw) == clean


def test_the_pipeline_tokenizes_the_cleaned_text():
  tok = tokenizer_lib.Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=24)
  image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)
  raw_q, raw_c = "Is there a Pneumothorax? (left)", "Chest X-ray: no acute findings."
  vqa = pipeline._Example("vqa", tok, 32, "test")(
      {"id": "q", "image": image, "question": raw_q, "answers": ["yes"]})
  np.testing.assert_array_equal(vqa["input_ids"], tok([text.question(raw_q)])["input_ids"][0])
  assert not np.array_equal(vqa["input_ids"], tok([raw_q])["input_ids"][0])
  cap = pipeline._Example("caption", tok, 32, "pretrain", teacher=(tok.with_max_len(16), 20))(
      {"id": "c", "image": image, "caption": raw_c}, np.random.default_rng(0))
  np.testing.assert_array_equal(cap["input_ids"], tok([text.caption(raw_c)])["input_ids"][0])
  np.testing.assert_array_equal(cap["teacher_input_ids"],
                                tok.with_max_len(16)([text.caption(raw_c)])["input_ids"][0])
  # The teacher's image: the whole picture resized (squashed) to its size, not cropped.
  np.testing.assert_array_equal(cap["teacher_pixels"], np.asarray(
      Image.fromarray(image).resize((20, 20), Image.Resampling.BICUBIC)))
