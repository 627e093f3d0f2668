"""What a training run tells its researcher before it trains (printed by `loop.train`): notes
on how it will run (which checkpoints can be chosen, where its batches are made, a resume
on another device count or schedule) and warnings about its data (questions read cut, a
vocabulary that does not cover the text, test questions that are training questions). Each
note is its line, or None when there is nothing to say; `question_pieces` tokenizes the
questions once for the notes that count their pieces."""

from __future__ import annotations

import json
import math
import os

from medvqa_jax.data import splits as splits_lib
from medvqa_jax.train import optim


def schedule_note(saved_json: str, optim_cfg, start: int) -> str | None:
  """What a resume under another schedule (run length, optim.lr or optim.warmup_fraction)
  does to the learning rate: the schedule is the new one's (a run extended after its end
  restarts from a rate well above the one it ended at), or None for the same schedule."""
  saved = json.loads(saved_json).get("optim", {})
  changed = [k for k in ("total_steps", "lr", "warmup_fraction")
             if saved.get(k) is not None and saved[k] != optim_cfg.get(k)]
  if not saved.get("total_steps") or not changed:
    return None
  then_cfg = optim_cfg.copy_and_resolve_references()
  for k in changed:  # The run's own schedule, as recorded.
    then_cfg[k] = saved[k]
  was, now = (float(optim.schedule(c)(start)) for c in (then_cfg, optim_cfg))
  warmup = (max(int(optim_cfg.warmup_fraction * optim_cfg.total_steps), 1)
            if optim_cfg.warmup_fraction else 0)
  ramp = (f"; the warm-up is not restarted, but the new one lasts to step {warmup}: the rate "
          f"ramps on to {optim_cfg.lr:.3g} until then" if start < warmup
          else ", with no new warm-up")
  what = ", ".join(f"optim.{k} {saved[k]} -> {optim_cfg[k]}" for k in changed)
  return (f"note: the learning-rate schedule is recomputed ({what}): step {start} goes on at "
          f"{now:.3g} (it was at {was:.3g} of the run's {saved['total_steps']}-step schedule)"
          f"{ramp}")


def question_pieces(splits: dict, tokenizer) -> tuple[list[str], list[list[int]]]:
  """The splits' questions as the model reads them (cleaned), and their token ids uncut
  ([CLS] and [SEP] included): what the start-up notes below count, tokenized once."""
  from medvqa_jax.data import text as text_lib
  questions = [text_lib.question(r["question"]) for split in splits.values()
               for r in split.records]
  return questions, (tokenizer.hf(questions)["input_ids"] if questions else [])


def cut_questions_note(splits: dict, tokenizer, max_len: int, pieces=None) -> str | None:
  """A warning when questions of the splits take more than `max_len` word pieces ([CLS] and
  [SEP] included): the model reads them cut (PathVQA's longest yes/no questions put what
  they ask about at the end). `pieces`: `question_pieces(splits, tokenizer)`, if made."""
  questions, ids = pieces or question_pieces(splits, tokenizer)
  cut = [q for q, row in zip(questions, ids) if len(row) > max_len]
  if not cut:
    return None
  # By role and count: a held-out validation slice is named after the split it comes from.
  counts = ", ".join(f"{key} {len(split.records)}" for key, split in sorted(
      splits.items(), key=lambda kv: ("train", "val", "test").index(kv[0])))
  return (f"warning: {len(cut)} of the {len(questions)} questions ({counts}) are longer than "
          f"model.text.max_len={max_len} word pieces and are read cut (e.g. {cut[0]!r}); "
          "--config.model.text.max_len raises it (up to the text tower's positions)")


def test_overlap_note(splits: dict) -> str | None:
  """A note when test questions are, as the model reads them, questions this run trains on
  about the same image (`splits.shared_with`): a split that holds them, as VQA-RAD's does
  (46 of its 451 test questions), lets the test accuracy count answers seen in training."""
  if "train" not in splits or "test" not in splits:
    return None
  test = splits["test"].records
  shared = splits_lib.shared_with(splits["train"].records, test)
  if not shared["questions"]:
    return None
  return (f"note: {shared['questions']} of the {len(test)} test questions are, as the model "
          f"reads them, training questions about the same image ({shared['same_answers']} "
          f"with the same answer; {shared['images']} of the test images are in training): "
          "the split holds them, and the test accuracy counts them")


def unknown_pieces_note(splits: dict, answers: list[str], tokenizer, limit: float = 0.01,
                        pieces=None) -> str | None:
  """A warning when more than `limit` of the questions' word pieces, or of the answers, are
  the tokenizer's unknown piece: a vocabulary that does not cover the text (SLAKE's Chinese
  with an English BERT vocabulary: two thirds of the pieces [UNK], half the test questions
  reading like another one, a third of the answers indistinguishable), which trained and
  tested with nothing said but a note on ranking. `pieces`: `question_pieces(splits,
  tokenizer)`, if made."""
  hf = tokenizer.hf
  unk = hf.unk_token_id
  if unk is None:
    return None
  special = set(hf.all_special_ids) - {unk}
  questions, ids = pieces or question_pieces(splits, tokenizer)
  pieces = [[t for t in row if t not in special] for row in ids]
  total = sum(map(len, pieces))
  share = sum(row.count(unk) for row in pieces) / max(total, 1)
  unknown_answers = [a for a, ids in zip(answers, hf(list(answers))["input_ids"] if answers
                                          else []) if unk in ids]
  if share <= limit and len(unknown_answers) <= limit * len(answers):
    return None
  q = next((q for q, row in zip(questions, pieces) if unk in row), None)
  example = q if q is not None else unknown_answers[0]
  return (f"warning: {share:.1%} of the questions' word pieces and {len(unknown_answers)} of "
          f"the {len(answers)} answers are the tokenizer's unknown piece {hf.unk_token} (e.g. "
          f"{example!r} reads as {' '.join(hf.tokenize(example))!r}): its vocabulary does "
          "not cover this text, so different questions read alike and answers cannot be told "
          "apart. Use a tokenizer (model.text.tokenizer) and text tower that cover it")


def selection_note(tc, steps: int) -> str | None:
  """A note when some checkpoints will have no validation to choose by: the best checkpoint
  is chosen among the steps both saved and validated (every lcm(save_every, eval_every) and
  the last), so a save_every that is not a multiple of eval_every leaves the others out."""
  save, every = tc.save_every, tc.eval_every
  if save >= steps > every:
    return (f"note: train.save_every={save} saves only the last of the run's {steps} steps: "
            f"it is the one tested, and the validations every {every} steps go to the logs "
            "only")
  if save % every == 0 or save >= steps:  # Every saved step is validated.
    return None
  both = math.lcm(save, every)
  when = f"every {both} steps and the last" if both < steps else "the last step only"
  # Saved more often than validated (every validated step saved), nothing validated is lost.
  rest = ("the other validations go to the logs only" if every % save else
          "the checkpoints between them serve resumption only")
  return (f"note: train.save_every={save} is not a multiple of train.eval_every={every}: "
          f"the best checkpoint is chosen among the steps both saved and validated ({when}); "
          f"{rest}")


def devices_note(then: int | None, now: int) -> str | None:
  """A note when a run resumes on another device count than its checkpoint was written on:
  the same batches and keys, but gradients reduced over other shards round otherwise."""
  if then is None or then == now:
    return None
  return (f"note: resumed on {now} device(s), the checkpoint was written on {then}: the same "
          "batches and random keys, but reductions over other shards round otherwise, so the "
          "numbers will not match an uninterrupted run bit for bit")


def workers_note(platform: str, workers: int, cores: int | None = None) -> str | None:
  """A note when an accelerator's batches are made in the training process (data.workers=0,
  the default, right for a CPU): two threads, under Python's lock, made about 340 images of
  288 px a second on this project's development CPU, where the paper-size fine-tuning step
  of BENCHMARKS.md takes about 600 a second (576-667: 111 and 96 ms at batch 64)."""
  if platform == "cpu" or workers:
    return None
  if cores is None:  # Those this process may use (a Slurm task's binding narrows them).
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count())
  return (f"note: data.workers=0: the batches are made in this process, two at a time, and the "
          f"{platform} may wait for them; set --config.data.workers=N to make them in N "
          f"processes ({cores} cores are this process's; launch/benchmark_input.py measures "
          "the rate each gives)")
