"""Our one-line errors quote a library's error (TensorStore's, transformers', safetensors')
by the first line of its message: many run to several lines, some to a traceback."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of `error`'s message, at most `limit` characters ("" for none)."""
  return (str(error).strip().splitlines() or [""])[0][:limit]
