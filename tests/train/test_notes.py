"""What a run says before it trains (`medvqa_jax/train/notes.py`): each note or warning
when it applies, word for word, and nothing when it does not."""

import re

import helpers
from medvqa_jax import ASSETS
from medvqa_jax.data.tokenizer import Tokenizer
from medvqa_jax.train import notes


def test_test_questions_the_run_trains_on_are_noted(tmp_path):
  """The demo's VQA-RAD (the MEVF split): 40 test questions are, as the model reads them,
  questions of the training it does (VQA-RAD's frames, "Is/Are there ...?", read as its test
  questions; 6 more of the 46 fall in the validation slice), about 182 of the 203 test
  images (RESULTS.md). A test split that shares no question is not noted."""
  import dataclasses

  from configs import demo
  from medvqa_jax.data import splits as splits_lib
  config = demo.get_config()
  config.data.dir = str(tmp_path / "data")
  splits = splits_lib.vqa_splits(config.data)
  assert notes.test_overlap_note(splits) == (
      "note: 40 of the 451 test questions are, as the model reads them, training questions "
      "about the same image (40 with the same answer; 182 of the test images are in "
      "training): the split holds them, and the test accuracy counts them")
  elsewhere = [dict(r, image_id=f"other-{r['image_id']}") for r in splits["test"].records]
  splits["test"] = dataclasses.replace(splits["test"], records=elsewhere)
  assert notes.test_overlap_note(splits) is None


def test_an_accelerator_fed_by_the_training_process_alone_is_noted():
  """data.workers=0 (the default) made a GPU's batches in the training process, two at a
  time: about half of what a paper-size step takes, without a word."""
  assert notes.workers_note("cpu", 0, 2) is None and notes.workers_note("gpu", 12, 16) is None
  assert notes.workers_note("gpu", 0, 16) == (
      "note: data.workers=0: the batches are made in this process, two at a time, and the gpu "
      "may wait for them; set --config.data.workers=N to make them in N processes (16 cores "
      "are this process's; launch/benchmark_input.py measures the rate each gives)")


def test_a_schedule_that_saves_steps_it_does_not_validate_is_noted():
  """The best checkpoint is chosen among the steps both saved and validated: with save_every
  not a multiple of eval_every, the run says which steps those are."""
  from ml_collections import ConfigDict
  tc = lambda save, every: ConfigDict(dict(save_every=save, eval_every=every))
  assert notes.selection_note(tc(500, 100), 2000) is None  # Every save is validated.
  assert notes.selection_note(tc(500, 500), 500) is None   # Only the last step, validated.
  # Only the last step is saved (a save_every raised to save disk): the others' validations
  # cannot choose the step tested.
  for save, every in ((500, 300), (1000, 100)):
    assert notes.selection_note(tc(save, every), 500) == (
        f"note: train.save_every={save} saves only the last of the run's 500 steps: it is the "
        f"one tested, and the validations every {every} steps go to the logs only")
  assert notes.selection_note(tc(500, 300), 4000) == (
      "note: train.save_every=500 is not a multiple of train.eval_every=300: the best "
      "checkpoint is chosen among the steps both saved and validated (every 1500 steps and "
      "the last); the other validations go to the logs only")
  assert "(the last step only)" in notes.selection_note(tc(500, 300), 1200)
  # Saved twice per validation: every validation has its checkpoint (the note said the others
  # went to the logs only); the saves between them cannot be chosen.
  assert notes.selection_note(tc(40, 80), 400) == (
      "note: train.save_every=40 is not a multiple of train.eval_every=80: the best "
      "checkpoint is chosen among the steps both saved and validated (every 80 steps and the "
      "last); the checkpoints between them serve resumption only")


def test_questions_the_model_reads_cut_are_counted():
  """Questions longer than model.text.max_len word pieces are read cut (a tenth of PathVQA's
  at 30): the run warns with their count and an example."""
  import types
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)
  records = lambda *qs: [{"question": q} for q in qs]
  splits = {"train": types.SimpleNamespace(name="train", records=records(
                "is there a fracture?", "does this biopsy of the left kidney show clear cell "
                "carcinoma with eosinophilic cytoplasm?")),
            "test": types.SimpleNamespace(name="test", records=records("what organ is this?"))}
  # A held-out slice is named after its split: listed by role ("train (held-out...)+train").
  splits = {"val": types.SimpleNamespace(name="train (held-out 10% of images)", records=[]),
            **splits}
  note = notes.cut_questions_note(splits, tok, 12)
  assert note.startswith("warning: 1 of the 3 questions (train 2, val 0, test 1) are longer than "
                         "model.text.max_len=12 word pieces and are read cut (e.g. 'does this")
  assert notes.cut_questions_note(splits, tok, 30) is None
  # A question of exactly max_len pieces is read whole; one more and it is cut.
  short = {"train": types.SimpleNamespace(name="train", records=records("is there a fracture?"))}
  (row,) = notes.question_pieces(short, tok)[1]
  assert notes.cut_questions_note(short, tok, len(row)) is None
  assert notes.cut_questions_note(short, tok, len(row) - 1).startswith("warning: 1 of the 1")


def test_text_the_tokenizer_does_not_cover_is_warned_of():
  """SLAKE's Chinese with an English BERT vocabulary: two thirds of the question pieces and
  most answers are [UNK], questions read alike and answers cannot be told apart; it trained
  and tested with a note on ranking only. English text passes without a word."""
  import types
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=24)
  records = lambda *qs: [{"question": q} for q in qs]
  english = {"train": types.SimpleNamespace(records=records("is there a fracture?",
                                                            "which organ is abnormal?"))}
  assert notes.unknown_pieces_note(english, ["yes", "no", "left lung"], tok) is None
  chinese = {"train": types.SimpleNamespace(records=records("图片中的器官是什么?", "肝脏在哪里?",
                                                            "is there a fracture?"))}
  note = notes.unknown_pieces_note(chinese, ["肝脏", "胸腔", "yes"], tok)
  assert re.fullmatch(r"warning: \d+\.\d% of the questions' word pieces and 2 of the 3 answers "
                      r"are the tokenizer's unknown piece \[UNK\] \(e\.g\. '图片中的器官是什么' "
                      r"reads as '.*\[UNK\].*'\): its vocabulary does not cover this text, .*"
                      r"Use a tokenizer \(model.text.tokenizer\) and text tower that cover it",
                      note), note
  # The answers alone (English questions) are enough to be told.
  assert notes.unknown_pieces_note(english, ["肝脏", "yes", "no"], tok).startswith(
      "warning: 0.0% of the questions' word pieces and 1 of the 3 answers")


def test_a_resume_under_another_length_says_what_becomes_of_the_learning_rate():
  """Extending a finished run recomputes the schedule for the new length: the rate jumps from
  the old schedule's end to the new one's middle, which the resume now says."""
  import json

  import optax
  config = helpers.tiny_config()
  config.optim.update(lr=1e-3, warmup_fraction=0.1, total_steps=60)
  saved = json.dumps({"optim": {"total_steps": 30}})
  warm = lambda n: optax.warmup_cosine_decay_schedule(0.0, 1e-3, int(0.1 * n), n, 0.0)
  note = notes.schedule_note(saved, config.optim, 29)
  assert note == (f"note: the learning-rate schedule is recomputed (optim.total_steps 30 -> 60): "
                  f"step 29 goes on at {float(warm(60)(29)):.3g} (it was at "
                  f"{float(warm(30)(29)):.3g} of the run's 30-step schedule), with no new "
                  "warm-up")
  assert "goes on at 0.000615 (it was at 3.38e-06" in note  # Near the peak again, from ~0.
  assert notes.schedule_note(json.dumps({"optim": {"total_steps": 60}}), config.optim, 29) is None
  assert notes.schedule_note(json.dumps({}), config.optim, 29) is None  # Older records.
  # The rate it was at is the run's own schedule's: with optim.lr changed too, it was
  # computed at the new rate (0.00122 for 0.000611 here).
  config.optim.update(lr=2e-3, warmup_fraction=0.1, total_steps=12)
  was = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 1, 8, 0.0)(4)
  note = notes.schedule_note(json.dumps({"optim": {"total_steps": 8, "lr": 1e-3,
                                                  "warmup_fraction": 0.1}}), config.optim, 4)
  assert f"(it was at {float(was):.3g} of the run's 8-step schedule)" in note
  assert "(optim.total_steps 8 -> 12, optim.lr 0.001 -> 0.002)" in note
  # Extended far enough, the new warm-up is longer than the steps done: the rate ramps again.
  config.optim.update(lr=1e-3, warmup_fraction=0.4, total_steps=100)
  note = notes.schedule_note(json.dumps({"optim": {"total_steps": 10, "lr": 1e-3,
                                                  "warmup_fraction": 0.4}}), config.optim, 10)
  assert note.endswith("the warm-up is not restarted, but the new one lasts to step 40: the "
                       "rate ramps on to 0.001 until then")
  # Resumed exactly where the new warm-up ends, the rate is at its peak: nothing ramps.
  note = notes.schedule_note(json.dumps({"optim": {"total_steps": 10, "lr": 1e-3,
                                                  "warmup_fraction": 0.4}}), config.optim, 40)
  assert "goes on at 0.001 (" in note and note.endswith(", with no new warm-up")


def test_a_resume_on_another_device_count_is_noted():
  """Resumed on another device count, a run continues (same batches and keys) but rounds
  otherwise: said, where it was silent; the same count, or a record older than the field, is
  not noted."""
  assert notes.devices_note(8, 8) is None and notes.devices_note(None, 1) is None
  assert notes.devices_note(2, 1) == (
      "note: resumed on 1 device(s), the checkpoint was written on 2: the same batches and "
      "random keys, but reductions over other shards round otherwise, so the numbers will not "
      "match an uninterrupted run bit for bit")
