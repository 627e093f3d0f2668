"""errors.first_line: a library's error quoted in our one-line errors by its message's first
line (many run to several lines, some to a traceback)."""

from medvqa_jax.errors import first_line


def test_the_first_line_of_the_message_is_quoted():
  assert first_line(ValueError("a\nb")) == "a"
  assert first_line(OSError("Traceback (most recent call last):\n  File ...")) == (
      "Traceback (most recent call last):")
  # A message that begins with a line break (or blanks): its first line with text.
  assert first_line(ValueError("\n  checksum mismatch\n  at offset 12\n")) == "checksum mismatch"
  assert first_line(ValueError()) == "" and first_line(ValueError("\n \n")) == ""
  assert first_line(ValueError("x" * 400)) == "x" * 300
  assert first_line(ValueError("abcdef\nz"), limit=3) == "abc"
