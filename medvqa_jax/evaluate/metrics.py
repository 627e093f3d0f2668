"""VQA accuracy: exact match after normalisation (any "#" alternative counts), overall, for
open and closed questions by both definitions (the dataset's own answer_type field, and
"the ground truth is yes/no" as the reference code counts), and per question category."""

from __future__ import annotations

from collections import defaultdict

from medvqa_jax.data import answers as answers_lib


def _acc(flags: list[bool]) -> dict:
  return {"accuracy": sum(flags) / len(flags) if flags else None, "questions": len(flags)}


def vqa_accuracy(records: list[dict], predictions: list[str]) -> dict:
  """records: per question `answers` (reference and alternatives), `answer_type`,
  `question_type`; predictions: the answer strings, in the same order."""
  if len(records) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(records)} questions")
  correct = [answers_lib.is_correct(p, r["answers"]) for r, p in zip(records, predictions)]
  by_type, by_yes_no, by_category = defaultdict(list), defaultdict(list), defaultdict(list)
  for r, c in zip(records, correct):
    by_type[answers_lib.answer_type(r.get("answer_type")) or "(none)"].append(c)
    by_yes_no["closed" if answers_lib.is_yes_no(r["answers"]) else "open"].append(c)
    if r.get("question_type"):
      by_category[r["question_type"]].append(c)
  out = {"questions": len(records), "overall": _acc(correct)["accuracy"],
         "open": _acc(by_type.get("OPEN", []))["accuracy"],
         "closed": _acc(by_type.get("CLOSED", []))["accuracy"],
         "by_answer_type": {k: _acc(v) for k, v in sorted(by_type.items())},
         "by_yes_no": {k: _acc(by_yes_no.get(k, [])) for k in ("open", "closed")}}
  if by_category:
    out["by_question_type"] = {k: _acc(v) for k, v in sorted(by_category.items())}
  return out
