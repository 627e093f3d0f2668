"""Image decoding to the uint8 RGB (H, W, 3) pixels the image towers take (they normalise on
device: `models.vit.normalize`), and `load_image`, one image read whole into a tower's
square."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medvqa_jax.data import augment

_ORIENTATION = 0x0112  # The EXIF tag.


def needs_turning(img: Image.Image) -> bool:
  """Whether an image's EXIF orientation says its pixels are stored turned or mirrored (phone
  photos, some scanners)."""
  return img.getexif().get(_ORIENTATION, 1) != 1


def upright(img: Image.Image) -> Image.Image:
  """The image as it is meant to be seen: turned by its EXIF orientation."""
  return ImageOps.exif_transpose(img) if needs_turning(img) else img


def _stretched(x: np.ndarray) -> np.ndarray:
  """uint8 of high-bit-depth samples, stretched from their own minimum-maximum to 0-255. The
  range is the finite samples' (one NaN or inf turned the whole image black); a NaN or
  infinite sample becomes 0."""
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  if not finite.any():
    return np.zeros(x.shape, np.uint8)
  lo, hi = float(x[finite].min()), float(x[finite].max())
  x = (np.where(finite, x, lo) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
  return np.round(x).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """uint8 RGB of `rgb` (uint8) composited by `alpha` (0-1) onto white."""
  a = alpha[..., None]
  return np.round(rgb * a + 255.0 * (1 - a)).astype(np.uint8)


def _deep(img: Image.Image) -> bool:
  """Whether PIL holds the image as high-bit-depth grayscale (16-bit, 32-bit integer, float)."""
  return img.mode in ("I", "F") or img.mode.startswith("I;16")


def white_is_zero(img: Image.Image) -> bool:
  """A high-bit-depth grayscale TIFF whose photometric interpretation is "white is zero"
  (what ImageJ saves for an inverted lookup table, and MONOCHROME1 radiographs): PIL inverts
  8-bit ones as it decodes them, not these. Asked before `upright`, whose turned copy has no
  TIFF tags."""
  return img.format == "TIFF" and _deep(img) and img.tag_v2.get(262) == 0


def to_rgb(img: Image.Image, inverted: bool = False) -> Image.Image:
  """RGB of an image in any PIL mode. High-bit-depth grayscale (16-bit PNG, 32-bit integer or
  float: how scans exported from DICOM often come) is stretched from its own minimum-maximum
  to 0-255 (then inverted if `inverted`: see `white_is_zero`); PIL's own conversion
  clips it at 255, which turns nearly every pixel white. An image with transparency is
  composited onto white, as a page shows it: dropping the alpha turned a black drawing on
  transparent black into one flat colour. An alpha of 0 everywhere (an exporter's mistake:
  nothing would be seen) is ignored."""
  if _deep(img):
    x = np.asarray(img)
    gray = _stretched(x)
    if inverted:
      gray = 255 - gray
    key = img.info.get("transparency")  # A 16-bit PNG's transparent grey level (tRNS).
    if isinstance(key, int) and (x != key).any():
      return Image.fromarray(_on_white(np.repeat(gray[..., None], 3, -1),
                                       (x != key).astype(np.float64)), "RGB")
    img = Image.fromarray(gray, "L")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = np.asarray(img.convert("RGBA"))
    if rgba[..., 3].any():
      return Image.fromarray(_on_white(rgba[..., :3], rgba[..., 3] / 255.0), "RGB")
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")
  return img.convert("RGB")


_PNG = b"\x89PNG\r\n\x1a\n"


def full_depth(img: Image.Image, data: bytes) -> Image.Image:
  """`img` (PIL's decoding of `data`), unless `data` is a PNG of 16-bit colour or 16-bit gray
  with alpha: PIL keeps only the high byte of each sample of those (12-bit content comes out
  near black). They are decoded in full, stretched like 16-bit grayscale (`to_rgb`) and
  composited onto white by their alpha; the image's metadata (EXIF orientation) is kept. A
  TIFF of 16-bit colour, which PIL decodes the same way, is refused (OSError)."""
  if img.format == "TIFF" and img.mode in ("RGB", "RGBA"):
    bits = img.tag_v2.get(258)  # BitsPerSample.
    bits = bits if isinstance(bits, tuple) else (bits,)
    if any(b and b > 8 for b in bits):
      raise OSError(f"a TIFF of {max(bits)}-bit colour samples, which PIL reads only 8 bits "
                    "of: convert it to a 16-bit PNG")
  # The IHDR chunk comes first: bit depth at byte 24, colour type (2 RGB, 4 gray + alpha,
  # 6 RGBA) at byte 25.
  if not (data[:8] == _PNG and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)):
    return img
  import png  # pypng: PIL has no 16-bit colour mode.
  try:
    width, height, rows, info = png.Reader(bytes=data).asDirect()
    x = np.vstack([np.asarray(row, np.uint16) for row in rows])
  except png.Error as e:
    raise OSError(f"16-bit PNG: {e}") from None
  x = x.reshape(height, width, info["planes"])
  colour = _stretched(x[..., :3] if info["planes"] >= 3 else np.repeat(x[..., :1], 3, -1))
  if info["alpha"] and x[..., -1].any():
    # asDirect gives the samples at the significant bits a PNG states (sBIT), alpha's too.
    colour = _on_white(colour, x[..., -1] / float(2 ** info["bitdepth"] - 1))
  deep = Image.fromarray(colour, "RGB")
  deep.info.update(img.info)
  return deep


def decode(data: bytes) -> Image.Image:
  """PIL's decoding of an image file's bytes, loaded (not converted: see `rgb`). A file that
  cannot be read is a ValueError saying why, for the caller to name the file: the readers'
  own messages name an in-memory buffer, or warn of a "decompression bomb DOS attack" for a
  large scan (PIL's warning above 89 million pixels is not printed; its limit, twice that,
  is an error saying what to do)."""
  if not data:
    raise ValueError("an empty file (0 bytes)")
  if data[128:132] == b"DICM":
    raise ValueError("a DICOM file, which is not read here: export its pixels to an image "
                     "file first (a 16-bit PNG keeps their depth)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      img.load()
  except UnidentifiedImageError:
    raise ValueError("not an image format PIL can read") from None
  except Image.DecompressionBombError as e:
    size = str(e).split(", could be")[0].rstrip(".")
    raise ValueError(f"{size}: too large for PIL to open. Shrink the file first, or raise "
                     "the limit (PIL.Image.MAX_IMAGE_PIXELS) in the code that reads it") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(str(e)) from None
  return img


def rgb(img: Image.Image, data: bytes) -> Image.Image:
  """An image `decode`d from `data` as RGB, upright: in full depth (`full_depth`), turned by
  its EXIF orientation (`upright`), converted by `to_rgb`. A ValueError if it cannot be."""
  try:
    inverted = white_is_zero(img)
    return to_rgb(upright(full_depth(img, data)), inverted=inverted)
  except OSError as e:
    raise ValueError(str(e)) from None


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """Decodes an image file or encoded bytes to RGB (medical images are often grayscale, some
  of them 16-bit: `to_rgb`, `full_depth`), upright (`upright`)."""
  where = "image bytes" if isinstance(source, bytes) else str(source)
  try:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return rgb(decode(data), data)
  except IsADirectoryError:
    raise ValueError(f"{where} is a folder, not an image file") from None
  except (OSError, ValueError) as e:  # Reading the file (missing, not readable) or decoding.
    raise ValueError(f"cannot decode {where}: {e}") from None


def load_image(source, size: int) -> np.ndarray:
  """uint8 (size, size, 3): the whole image resized to a square, as evaluation and the teacher
  read a stored image (`augment.resize`, bicubic; no crop). A file as a build stores it:
  `builders.read_as_built`."""
  return augment.resize(np.asarray(open_image(source)), size)
