"""Image augmentations of the paper, on uint8 (H, W, 3) arrays, driven by a NumPy Generator
(grain hands each example a generator seeded from (dataset seed, index), so an augmented
example is a pure function of its position: resumed runs see the same pixels).

  finetune: RandomResizedCrop, scale (0.6, 1.0), then with p=0.8 RandAugment-style N=2 ops
            at magnitude M=7 (of 10).
  pretrain: RandomResizedCrop, scale (0.7, 1.0), colour jitter, random grayscale, Gaussian
            blur, horizontal flip; called once per view. The blur is drawn here and applied
            on the accelerator (`device_augment`): PIL's was a third of the host time.
  test:     resize to the square size.

`AUGMENTATIONS[name](x, size, rng)` gives (uint8 pixels, the blur's sigma for the device:
0.0 for none, None for augmentations without a blur).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _pil(x: np.ndarray) -> Image.Image:
  return Image.fromarray(np.asarray(x, np.uint8)).convert("RGB")


def resize(x: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(_pil(x).resize((size, size), Image.Resampling.BICUBIC))


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """torchvision's RandomResizedCrop: an area fraction in `scale`, log-uniform aspect ratio
  in `ratio`, up to 10 tries, else the central crop."""
  w, h = img.size
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      return img.resize((size, size), Image.Resampling.BICUBIC,
                        box=(left, top, left + cw, top + ch))
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  return img.resize((size, size), Image.Resampling.BICUBIC,
                    box=(left, top, left + side, top + side))


def _level(m: int, high: float) -> float:
  return m / 10 * high


def _signed(v: float, rng) -> float:
  return v if rng.random() < 0.5 else -v


# RandAugment's operations as used by ALBEF/METER-style VQA fine-tuning (no colour inversion).
_OPS = {
    "identity": lambda img, m, rng: img,
    "autocontrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(
        1 + _signed(_level(m, 0.9), rng)),
    "sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(
        1 + _signed(_level(m, 0.9), rng)),
    "contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(
        1 + _signed(_level(m, 0.9), rng)),
    "rotate": lambda img, m, rng: img.rotate(_signed(_level(m, 30), rng),
                                             resample=Image.Resampling.BILINEAR),
    "shear_x": lambda img, m, rng: img.transform(
        img.size, Image.Transform.AFFINE, (1, _signed(_level(m, 0.3), rng), 0, 0, 1, 0),
        resample=Image.Resampling.BILINEAR),
    "shear_y": lambda img, m, rng: img.transform(
        img.size, Image.Transform.AFFINE, (1, 0, 0, _signed(_level(m, 0.3), rng), 1, 0),
        resample=Image.Resampling.BILINEAR),
    "translate_x": lambda img, m, rng: img.transform(
        img.size, Image.Transform.AFFINE,
        (1, 0, _signed(_level(m, 0.3), rng) * img.width, 0, 1, 0)),
    "translate_y": lambda img, m, rng: img.transform(
        img.size, Image.Transform.AFFINE,
        (1, 0, 0, 0, 1, _signed(_level(m, 0.3), rng) * img.height)),
}
OPS = tuple(_OPS)


def rand_augment(img: Image.Image, rng, n: int = 2, m: int = 7) -> Image.Image:
  for name in rng.choice(OPS, size=n):
    img = _OPS[str(name)](img, m, rng)
  return img


def finetune(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  img = random_resized_crop(_pil(x), size, rng, scale=(0.6, 1.0))
  if rng.random() < 0.8:
    img = rand_augment(img, rng, n=2, m=7)
  return np.asarray(img)


BLUR_SIGMA = (0.1, 2.0)  # The pre-training blur's sigma range, applied to half the views.


def pretrain(x: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
  """One pre-training view: (uint8 pixels, the sigma of its Gaussian blur, 0.0 for none), the
  blur left to `device_augment.gaussian_blur`. It commutes with the flip, which is done here."""
  img = random_resized_crop(_pil(x), size, rng, scale=(0.7, 1.0))
  if rng.random() < 0.8:  # Colour jitter: brightness, contrast, saturation 0.4, random order.
    for i in rng.permutation(3):
      enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
      img = enhance(img).enhance(rng.uniform(0.6, 1.4))
  if rng.random() < 0.2:
    img = ImageOps.grayscale(img).convert("RGB")
  sigma = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < 0.5 else 0.0
  if rng.random() < 0.5:
    img = ImageOps.mirror(img)
  return np.asarray(img), sigma


AUGMENTATIONS = {"finetune": lambda x, size, rng: (finetune(x, size, rng), None),
                 "pretrain": pretrain,
                 "test": lambda x, size, rng: (resize(x, size), None)}
