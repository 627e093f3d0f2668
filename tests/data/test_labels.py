"""VQA targets from raw answers: the classifier label and the generative head's answer
tokens are those of the normalised answer, as the answer vocabulary is built from it."""

import numpy as np
import pytest

from medvqa_jax import ASSETS
from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import pipeline
from medvqa_jax.data.tokenizer import Tokenizer

# Raw reference answers as datasets spell them, and their normalised forms.
RAW = ["Yes.", "The left lung", "No!", "MRI - T2 weighted", "Two"]
NORMALISED = ["yes", "left lung", "no", "mri t2 weighted", "2"]
VOCAB = ["no", "2", "left lung", "yes", "mri t2 weighted"]  # Not in RAW's order.


@pytest.fixture(scope="module")
def tokenizers():
  question = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)
  return question, question.with_max_len(6)


def _source():
  rng = np.random.default_rng(0)
  return [{"id": f"q{i}", "image": rng.integers(0, 255, (20, 24, 3), np.uint8),
           "question": f"what is shown in image {i}?", "answers": [raw, "other"]}
          for i, raw in enumerate(RAW)]


def test_normalisation_changes_the_raw_answers():
  """The fixture is only a test of the lookup if raw and normalised answers differ, labels
  and tokens both."""
  assert [answers_lib.normalize(a) for a in RAW] == NORMALISED
  assert all(r != n for r, n in zip(RAW, NORMALISED))


def test_example_labels_and_answer_tokens_are_the_normalised_answers(tokenizers):
  question_tok, answer_tok = tokenizers
  fn = pipeline._Example("vqa", question_tok, 16, "test", answer_vocab=VOCAB,
                         answer_tokenizer=answer_tok)
  for ex, raw, norm in zip(_source(), RAW, NORMALISED):
    out = fn(ex)
    assert int(out["labels"]) == VOCAB.index(norm), raw
    assert out["answer"] == f"{raw}#other"  # The references themselves stay raw.
    want = answer_tok([norm])
    np.testing.assert_array_equal(out["answer_ids"], want["input_ids"][0], err_msg=raw)
    np.testing.assert_array_equal(out["answer_mask"], want["attention_mask"][0], err_msg=raw)
    # The raw spelling would tokenise otherwise ("yes ." / "the left lung" ...).
    assert not np.array_equal(answer_tok([raw])["input_ids"][0], want["input_ids"][0]), raw
  unknown = fn(dict(_source()[0], answers=["Cardiomegaly."]))
  assert int(unknown["labels"]) == -1


def test_batches_carry_the_normalised_labels_and_answer_tokens(tokenizers):
  question_tok, answer_tok = tokenizers
  ds = pipeline.batches(_source(), kind="vqa", tokenizer=question_tok, image_size=16,
                        global_batch=5, seed=0, augmentation="test", shuffle=False,
                        repeat=False, answer_vocab=VOCAB, answer_tokenizer=answer_tok)
  batch = ds[0]
  assert list(batch["id"]) == [f"q{i}" for i in range(5)]
  np.testing.assert_array_equal(batch["labels"], [VOCAB.index(n) for n in NORMALISED])
  np.testing.assert_array_equal(batch["answer_ids"], answer_tok(NORMALISED)["input_ids"])
  np.testing.assert_array_equal(batch["answer_mask"], answer_tok(NORMALISED)["attention_mask"])
