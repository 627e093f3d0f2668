"""Image decoding and the CLIP-style preprocessing the towers expect (NHWC float32)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation; BiomedCLIP and PubMedCLIP use the same constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """Decodes an image file or encoded bytes to RGB (medical images are often grayscale)."""
  try:
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
  except (OSError, SyntaxError) as e:
    where = "image bytes" if isinstance(source, bytes) else str(source)
    raise ValueError(f"cannot decode {where}: {e}") from None
  return img.convert("RGB")


def preprocess(img: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic), centre-crops, scales to [0, 1], normalises."""
  w, h = img.size
  scale = size / min(w, h)
  img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                   Image.Resampling.BICUBIC)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  img = img.crop((left, top, left + size, top + size))
  x = np.asarray(img, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_image(source, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  return preprocess(open_image(source), size, mean, std)
