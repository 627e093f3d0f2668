"""A picture of one answer: the image with the question-to-patch attention of the last
fusion layer overlaid, and the GCA gate strength (mean over channels) of every question
token as bars. Drawn with PIL alone."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def patch_heatmap(text_to_image, text_mask) -> np.ndarray:
  """(g, g) attention of the question's words (its first and last real tokens, CLS and SEP,
  and padding left out) to the image patches (image CLS left out), averaged over heads and
  tokens, scaled to [0, 1]. text_to_image: (heads, Lt, Li) of one example."""
  w = np.asarray(text_to_image, np.float64).mean(axis=0)[:, 1:]  # heads; image CLS
  mask = np.asarray(text_mask, bool).copy()
  real = np.flatnonzero(mask)
  mask[real[[0, -1]] if real.size > 2 else real[:1]] = False  # CLS, SEP
  w = w[mask].mean(axis=0) if mask.any() else w.mean(axis=0)
  g = int(round(np.sqrt(w.size)))
  if g * g != w.size:
    raise ValueError(f"{w.size} image patches do not form a square grid")
  w = w.reshape(g, g)
  return (w - w.min()) / max(w.max() - w.min(), 1e-12)


def render(image: Image.Image, heatmap: np.ndarray, tokens: list[str], gates: np.ndarray,
           question: str, answers: list[tuple[str, float]], size: int = 384) -> Image.Image:
  image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
  heat = Image.fromarray(np.uint8(255 * heatmap)).resize((size, size), Image.Resampling.BICUBIC)
  red = Image.new("RGB", (size, size), (255, 40, 0))
  overlay = Image.composite(red, image, heat.point(lambda v: int(v * 0.6)))
  font = ImageFont.load_default()
  row = 14
  height = size + row * (3 + len(answers) + len(tokens))
  canvas = Image.new("RGB", (max(size, 2 * size), height), "white")
  canvas.paste(image, (0, 0))
  canvas.paste(overlay, (size, 0))
  draw = ImageDraw.Draw(canvas)
  y = size + 4
  draw.text((4, y), f"Q: {question}", fill="black", font=font)
  y += row
  for text, score in answers:
    draw.text((4, y), f"{score:<9.3g} {text}", fill="black", font=font)
    y += row
  draw.text((4, y), "GCA gate (mean over channels) per question token:", fill="black", font=font)
  y += row
  for token, g in zip(tokens, gates):
    draw.text((4, y), token[:18], fill="black", font=font)
    draw.rectangle((140, y + 2, 140 + int(200 * float(g)), y + row - 3), fill=(40, 90, 200))
    draw.text((350, y), f"{float(g):.3f}", fill="black", font=font)
    y += row
  return canvas
