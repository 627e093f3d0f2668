"""Questions and captions as the model reads them, the reference code's clean-up before
tokenisation: lower case, punctuation dropped, and a few rewrites. The teacher reads the same
cleaned captions.

  question: drops , . ' ! ? " ( ) * # : ; ~; "is/are" -> "is", "near/in" -> "in",
            ">" -> "more than", "-yes/no" dropped, "x ray"/"x-ray" -> "xray".
  caption:  drops those and _; "-" and "/" become spaces; "<person>" -> "person"; runs of
            spaces become one.
Typographic quotes (‘ ’ “ ”, as text copied from papers has them) are dropped as the straight
ones are: "patient’s" reads as "patients", as "patient's" does (the reference drops the
straight ones only, and its tokenizer reads "patient ’ s").

Answers are normalised separately, by the evaluation protocol's rules (`answers.normalize`).
"""

from __future__ import annotations

import re

_QUESTION_DROP = re.compile(r"[,.'‘’!?\"“”()*#:;~]")
_CAPTION_DROP = re.compile(r"[_,.'‘’!?\"“”()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def question(text: str) -> str:
  q = _QUESTION_DROP.sub("", str(text).lower()).replace(" \t", " ")
  q = q.replace("is/are", "is").replace("near/in", "in")
  q = q.replace(">", "more than ").replace("-yes/no", "")
  q = q.replace("x ray", "xray").replace("x-ray", "xray")
  return q.rstrip(" ")


def caption(text: str) -> str:
  c = _CAPTION_DROP.sub("", str(text).lower())
  c = c.replace("-", " ").replace("/", " ").replace("<person>", "person")
  return _SPACES.sub(" ", c).strip()
