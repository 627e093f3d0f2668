"""Answer handling, in one place: normalisation, matching, vocabulary, validation slice.

Normalisation follows the VQA evaluation toolkit (lowercase; punctuation stripped, or replaced
by a space between words; periods kept inside numbers; number words to digits; articles
dropped), plus "x-ray" and "x ray" -> "xray". It departs from the toolkit in two ways:
- fourteen more characters count as punctuation: ' : * % ^ & # $ | ~ and the typographic
  quotes ‘ ’ “ ” ("On the patient's left" and "On the patient’s left" -> "on patient s left",
  "5%" -> "5"). "#" must go: it separates a reference's alternatives.
- the toolkit's contraction table ("dont" -> "don't") is not applied.
On the full VQA-RAD and SLAKE and the PathVQA and VQA-Med-2019 samples of ../shared/data, that
normalises 7 answers otherwise than the toolkit (5 with an apostrophe, "5%", "~15 minutes"),
and, within each dataset, merges no two answers that the toolkit keeps apart (across them,
VQA-RAD's "5%" and SLAKE's "5" become one). As the toolkit does, it reads "none" as "0": SLAKE's
"None" (no disease, no damage) and "0" (no kidney) are one answer.

VQA-Med-2019 references may list alternatives separated by "#": a prediction matching any of
them is correct.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Iterable, Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!", "'", ":", "*", "%", "^", "&", "#", "$", "|", "~",
          "\u2018", "\u2019", "\u201c", "\u201d"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize(answer: str) -> str:
  text = str(answer).lower().replace("\n", " ").replace("\t", " ").strip()
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = [_NUMBERS.get(w, w) for w in out.split()]
  # "x-ray", "x ray", "x - ray", "x/ray" ... -> "xray", merged last (on the final words), so
  # that normalising a normalised answer changes nothing.
  joined = " ".join(w for w in words if w not in _ARTICLES)
  return re.sub(r"\bx ray(s?)\b", r"xray\1", joined)


def alternatives(reference: str | Sequence[str]) -> list[str]:
  """The normalised correct answers of a reference: a "#"-separated string, or a list of
  answers each taken whole (the readers split a file's "#" lists into such lists)."""
  refs = reference.split("#") if isinstance(reference, str) else list(reference)
  return [normalize(r) for r in refs if str(r).strip()]


def is_correct(prediction: str, reference: str | Sequence[str]) -> bool:
  return normalize(prediction) in alternatives(reference)


def is_yes_no(reference: str | Sequence[str]) -> bool:
  """The reference code's definition of a closed question: the ground truth is yes/no."""
  alts = alternatives(reference)
  return bool(alts) and all(a in ("yes", "no") for a in alts)


def answer_type(raw: str | None) -> str:
  """The dataset's own answer_type field, trimmed and upper-cased ("CLOSED " -> "CLOSED")."""
  return (raw or "").strip().upper()


def vocabulary(answers: Iterable[str], min_count: int = 1) -> list[str]:
  """Distinct normalised answers, most frequent first (ties alphabetical). Build it from the
  training splits only: test answers must not leak into the model."""
  counts = Counter(n for n in map(normalize, answers) if n)
  return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def validation_slice(ids: Sequence[str], fraction: float = 0.1, seed: int = 0,
                     groups: Sequence[str] | None = None) -> set[str]:
  """A fixed, seeded slice of a training split for model selection, for datasets without a
  validation split (VQA-RAD). With `groups` (e.g. image ids), whole groups are held out, so
  that no image is in both parts."""
  if not fraction > 0:
    return set()
  keys = list(groups) if groups is not None else list(ids)
  distinct = sorted(set(keys))
  rng = random.Random(seed)
  rng.shuffle(distinct)
  held = set(distinct[:max(1, round(fraction * len(distinct)))])
  return {i for i, k in zip(ids, keys) if k in held}


def longer_than(answers: Sequence[str], hf_tokenizer, max_len: int) -> list[str]:
  """The answers that take more than `max_len` tokens ([CLS] and [SEP] included): the
  generative head sees them cut."""
  if not answers:
    return []
  lengths = [len(ids) for ids in hf_tokenizer(list(answers))["input_ids"]]
  return [a for a, n in zip(answers, lengths) if n > max_len]
