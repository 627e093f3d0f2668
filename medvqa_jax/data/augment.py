"""Image augmentations of the reference code, on stored images (a built dataset's JPEG bytes,
decoded here with PIL, or uint8 (H, W, 3) arrays) giving uint8 (size, size, 3) arrays, driven
by a NumPy Generator (grain hands each example a generator seeded from (dataset seed, index),
so an augmented example is a pure function of its position: resumed runs see the same pixels).
An image whose three bands are equal (most radiology) is augmented as its one band, a third
of the work, with the same result: every op here works band by band.

  finetune: RandomResizedCrop, scale (0.6, 1.0), then with p=0.8 RandAugment: N=2 ops at
            magnitude M=7 (of 10) from FINETUNE_OPS, each applied with p=0.5.
  pretrain: RandomResizedCrop, scale (0.7, 1.0); with p=0.6 colour jitter (brightness,
            contrast, saturation 0.4, hue 0.1); with p=0.1 grayscale; with p=0.8 RandAugment
            N=2, M=4 from PRETRAIN_OPS; with p=0.3 Gaussian blur (sigma 0.1-2); horizontal
            flip. Called once per view. The blur is drawn here and applied on the
            accelerator (`device_augment`): PIL's was a third of the host time.
  test:     resize to the square size.

The RandAugment is the one of ALBEF-style VQA code that the reference uses: an op's strength
is fixed by M (enhance factor 0.1 + 1.8 M/10, shear 0.3 M/10, translation 10 M/10 pixels,
rotation 30 M/10 degrees; the geometric ones in a random direction), and the pixels a
geometric op uncovers are grey (128).

`AUGMENTATIONS[name](x, size, rng)` gives (uint8 pixels, the blur's sigma for the device:
0.0 for none, None for augmentations without a blur).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageEnhance, ImageOps


def image(x) -> Image.Image:
  """A stored image as PIL: encoded bytes decoded here (not to an array and back), uint8
  (H, W, 3) pixels, or a PIL image (as it is). RGB, or L where its three bands are equal."""
  if isinstance(x, Image.Image):
    return x
  if isinstance(x, (bytes, np.bytes_)):
    img = Image.open(io.BytesIO(x))
    img.load()
  else:
    img = Image.fromarray(np.asarray(x, np.uint8))
  if img.mode == "L":
    return img
  return one_band(img if img.mode == "RGB" else img.convert("RGB"))


def one_band(img: Image.Image) -> Image.Image:
  """An RGB image whose bands are all equal as its one band (L), else itself (builds store a
  grey picture so: `builders.encode_image`). The centre pixel settles most colour images at
  once; the rest are compared whole (0.3 ms a picture)."""
  r, g, b = img.getpixel((img.width // 2, img.height // 2))
  if not r == g == b:
    return img
  red, green, blue = img.split()
  if ImageChops.difference(red, green).getbbox() or ImageChops.difference(green, blue).getbbox():
    return img
  return red


def _pixels(img: Image.Image) -> np.ndarray:
  """uint8 (H, W, 3): an L image's band three times."""
  x = np.asarray(img)
  return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x


def resize(x, size: int) -> np.ndarray:
  return _pixels(image(x).resize((size, size), Image.Resampling.BICUBIC))


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """torchvision's RandomResizedCrop: an area fraction in `scale`, log-uniform aspect ratio
  in `ratio`, up to 10 tries (`crop_box`), cut out, then resized to size x size as
  torchvision does (resizing the box in place, PIL's `box=`, reads the pixels around it into
  the crop's edge pixels)."""
  return img.crop(crop_box(*img.size, rng, scale, ratio)).resize((size, size),
                                                                 Image.Resampling.BICUBIC)


def crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.6, 1.0),
             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of RandomResizedCrop's crop of a w x h image. After 10 tries
  that do not fit, torchvision's fallback: the central crop of the whole image, narrowed to
  the nearest aspect ratio in `ratio` (images more elongated than about 2:1 get it every
  time at scale 0.6)."""
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      return left, top, left + cw, top + ch
  cw, ch = w, h
  if w / h < min(ratio):
    ch = round(w / min(ratio))
  elif w / h > max(ratio):
    cw = round(h * max(ratio))
  left, top = (w - cw) // 2, (h - ch) // 2
  return left, top, left + cw, top + ch


FILL = (128, 128, 128)  # What a geometric op's uncovered pixels become.
TRANSLATE_PX = 10       # Translation at full magnitude, in pixels.


def _level(m: int, high: float) -> float:
  return m / 10 * high


def _signed(v: float, rng) -> float:
  return v if rng.random() < 0.5 else -v


def _factor(m: int) -> float:
  return 0.1 + _level(m, 1.8)


def _fill(img: Image.Image):
  return FILL[0] if img.mode == "L" else FILL


def _affine(img: Image.Image, coeffs) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                       resample=Image.Resampling.BILINEAR, fillcolor=_fill(img))


_OPS = {
    "identity": lambda img, m, rng: img,
    "autocontrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(_factor(m)),
    "sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(_factor(m)),
    "shear_x": lambda img, m, rng: _affine(img, (1, _signed(_level(m, 0.3), rng), 0, 0, 1, 0)),
    "shear_y": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(_level(m, 0.3), rng), 1, 0)),
    "translate_x": lambda img, m, rng: _affine(
        img, (1, 0, _signed(_level(m, TRANSLATE_PX), rng), 0, 1, 0)),
    "translate_y": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(_level(m, TRANSLATE_PX), rng))),
    "rotate": lambda img, m, rng: img.rotate(_signed(_level(m, 30), rng),
                                             resample=Image.Resampling.BILINEAR,
                                             fillcolor=_fill(img)),
}
OPS = tuple(_OPS)
FINETUNE_OPS = OPS
PRETRAIN_OPS = ("identity", "equalize", "sharpness", "shear_x", "shear_y", "translate_x",
                "translate_y", "rotate")


def rand_augment(img: Image.Image, rng, ops=FINETUNE_OPS, n: int = 2, m: int = 7) -> Image.Image:
  """n ops drawn from `ops` (with replacement), each then applied with probability 0.5."""
  for name in rng.choice(ops, size=n):
    if rng.random() < 0.5:
      img = _OPS[str(name)](img, m, rng)
  return img


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` turns (in [-0.5, 0.5]), in PIL's 8-bit HSV, as torchvision."""
  if img.mode == "L":  # Grey has no hue: PIL's HSV round trip gives grey pixels back as they were.
    return img
  h, s, v = img.convert("HSV").split()
  h = (np.asarray(h, np.int32) + int(shift * 255)) % 256
  return Image.merge("HSV", (Image.fromarray(h.astype(np.uint8), "L"), s, v)).convert("RGB")


def jitter(img: Image.Image, order, factors) -> Image.Image:
  """Colour jitter with drawn values: brightness, contrast and saturation factors and a hue
  shift (`factors`), applied in `order` (a permutation of 0-3)."""
  ops = (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
         lambda im, f: ImageEnhance.Contrast(im).enhance(f),
         lambda im, f: ImageEnhance.Color(im).enhance(f),
         adjust_hue)
  for i in order:
    img = ops[i](img, factors[i])
  return img


def colour_jitter(img: Image.Image, rng, strength: float = 0.4, hue: float = 0.1):
  """torchvision's ColorJitter(strength, strength, strength, hue): factors drawn uniformly in
  [1 - strength, 1 + strength], the hue shift in [-hue, hue], in a random order."""
  order = rng.permutation(4)
  factors = [rng.uniform(1 - strength, 1 + strength) for _ in range(3)] + [rng.uniform(-hue, hue)]
  return jitter(img, order, factors)


def finetune(x, size: int, rng: np.random.Generator) -> np.ndarray:
  img = random_resized_crop(image(x), size, rng, scale=(0.6, 1.0))
  if rng.random() < 0.8:
    img = rand_augment(img, rng, FINETUNE_OPS, n=2, m=7)
  return _pixels(img)


BLUR_SIGMA = (0.1, 2.0)  # The pre-training blur's sigma range, applied to 30% of the views.


def pretrain(x, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
  """One pre-training view: (uint8 pixels, the sigma of its Gaussian blur, 0.0 for none), the
  blur left to `device_augment.gaussian_blur`. It commutes with the flip, which is done here."""
  img = random_resized_crop(image(x), size, rng, scale=(0.7, 1.0))
  if rng.random() < 0.6:
    img = colour_jitter(img, rng)
  if rng.random() < 0.1:
    img = ImageOps.grayscale(img)  # One band from here: `_pixels` repeats it.
  if rng.random() < 0.8:
    img = rand_augment(img, rng, PRETRAIN_OPS, n=2, m=4)
  sigma = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < 0.3 else 0.0
  if rng.random() < 0.5:
    img = ImageOps.mirror(img)
  return _pixels(img), sigma


AUGMENTATIONS = {"finetune": lambda x, size, rng: (finetune(x, size, rng), None),
                 "pretrain": pretrain,
                 "test": lambda x, size, rng: (resize(x, size), None)}
