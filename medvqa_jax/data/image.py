"""Image decoding and the CLIP-style resize and centre crop, to the uint8 (H, W, 3) pixels
the image towers take (they normalise on device: `models.vit.normalize`)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """Decodes an image file or encoded bytes to RGB (medical images are often grayscale)."""
  try:
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
  except (OSError, SyntaxError) as e:
    where = "image bytes" if isinstance(source, bytes) else str(source)
    raise ValueError(f"cannot decode {where}: {e}") from None
  return img.convert("RGB")


def preprocess(img: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic) and centre-crops: uint8 (size, size, 3)."""
  w, h = img.size
  scale = size / min(w, h)
  img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                   Image.Resampling.BICUBIC)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, np.uint8)


def load_image(source, size: int) -> np.ndarray:
  return preprocess(open_image(source), size)
