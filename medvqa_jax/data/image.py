"""Image decoding and the CLIP-style resize and centre crop, to the uint8 (H, W, 3) pixels
the image towers take (they normalise on device: `models.vit.normalize`)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # The EXIF tag.


def needs_turning(img: Image.Image) -> bool:
  """Whether an image's EXIF orientation says its pixels are stored turned or mirrored (phone
  photos, some scanners)."""
  return img.getexif().get(_ORIENTATION, 1) != 1


def upright(img: Image.Image) -> Image.Image:
  """The image as it is meant to be seen: turned by its EXIF orientation."""
  return ImageOps.exif_transpose(img) if needs_turning(img) else img


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB of an image in any PIL mode. High-bit-depth grayscale (16-bit PNG, 32-bit integer or
  float: how scans exported from DICOM often come) is stretched from its own minimum-maximum
  to 0-255; PIL's own conversion clips it at 255, which turns nearly every pixel white."""
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):
    x = np.asarray(img, np.float64)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    img = Image.fromarray(np.round(x).astype(np.uint8), "L")
  return img.convert("RGB")


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """Decodes an image file or encoded bytes to RGB (medical images are often grayscale, some
  of them 16-bit: `to_rgb`), upright (`upright`)."""
  try:
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    img = upright(img)
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    where = "image bytes" if isinstance(source, bytes) else str(source)
    raise ValueError(f"cannot decode {where}: {e}") from None
  return to_rgb(img)


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
