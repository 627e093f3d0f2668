"""The augmentations (medvqa_jax/data/augment.py) against torchvision's colour ops, NumPy
shifts, and the reference recipe's probabilities and strengths."""

import collections

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from medvqa_jax.data import augment


def image(seed=0, shape=(40, 56, 3)):
  rng = np.random.default_rng(seed)
  smooth = rng.integers(0, 256, (shape[0] // 4, shape[1] // 4, 3), np.uint8)
  return Image.fromarray(smooth).resize(shape[1::-1], Image.Resampling.BILINEAR)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
@pytest.mark.parametrize("hue", [0.07, -0.09])
def test_colour_jitter_is_torchvisions(order, hue):
  img, factors = image(), (1.3, 0.7, 1.25, hue)
  ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
  expected = img
  for i in order:
    expected = ops[i](expected, factors[i])
  np.testing.assert_array_equal(np.asarray(augment.jitter(img, order, factors)),
                                np.asarray(expected))


def shifted(x, dx, dy):
  """x moved by (-dx, -dy) pixels (output pixel p shows input pixel p + d), grey outside."""
  out = np.full_like(x, 128)
  h, w = x.shape[:2]
  src = x[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
  out[max(-dy, 0):max(-dy, 0) + src.shape[0], max(-dx, 0):max(-dx, 0) + src.shape[1]] = src
  return out


@pytest.mark.parametrize("axis", ["x", "y"])
def test_translation_is_seven_pixels_at_m7_with_grey_fill(axis):
  img = image(1)
  x = np.asarray(img)
  seen = set()
  for seed in range(8):
    out = np.asarray(augment._OPS[f"translate_{axis}"](img, 7, np.random.default_rng(seed)))
    for d in (7, -7):
      if np.array_equal(out, shifted(x, *((d, 0) if axis == "x" else (0, d)))):
        seen.add(d)
        break
    else:
      raise AssertionError(f"translate_{axis} is not a 7-pixel shift (seed {seed})")
  assert seen == {7, -7}  # Both directions.


def test_geometric_ops_fill_with_grey_and_enhance_ops_use_a_fixed_factor():
  white = Image.new("RGB", (48, 48), (255, 255, 255))
  for name in ("rotate", "shear_x", "shear_y"):
    out = np.asarray(augment._OPS[name](white, 7, np.random.default_rng(0)))
    corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 128).all(axis=-1).any(), name
  x = np.asarray(image(2)).astype(np.float64)
  bright = np.asarray(augment._OPS["brightness"](image(2), 7, np.random.default_rng(0)))
  np.testing.assert_allclose(bright, np.clip(x * 1.36, 0, 255), atol=1)  # 0.1 + 1.8 * 0.7
  darker = np.asarray(augment._OPS["brightness"](image(2), 4, np.random.default_rng(0)))
  np.testing.assert_allclose(darker, x * 0.82, atol=1)                    # 0.1 + 1.8 * 0.4


def count_calls(monkeypatch, names):
  calls = collections.Counter()
  for name in names:
    monkeypatch.setitem(augment._OPS, name,
                        lambda img, m, rng, name=name: calls.update([(name, m)]) or img)
  return calls


def test_rand_augment_draws_from_its_list_and_applies_half(monkeypatch):
  calls = count_calls(monkeypatch, augment.OPS)
  rng, n = np.random.default_rng(0), 4000
  for _ in range(n):
    augment.rand_augment(Image.new("RGB", (8, 8)), rng, augment.PRETRAIN_OPS, n=2, m=4)
  assert {name for name, _ in calls} == set(augment.PRETRAIN_OPS)
  assert {m for _, m in calls} == {4}
  assert abs(sum(calls.values()) / n - 1.0) < 0.05  # Two drawn, each applied with p=0.5.
  assert "contrast" not in augment.FINETUNE_OPS and len(augment.FINETUNE_OPS) == 10


def test_recipe_probabilities(monkeypatch):
  seen = collections.Counter()
  monkeypatch.setattr(augment, "rand_augment",
                      lambda img, rng, ops, n, m: seen.update([("ra", ops, n, m)]) or img)
  monkeypatch.setattr(augment, "colour_jitter", lambda img, rng: seen.update(["jitter"]) or img)
  grey = augment.ImageOps.grayscale
  monkeypatch.setattr(augment.ImageOps, "grayscale",
                      lambda img: seen.update(["grayscale"]) or grey(img))
  x, n = np.asarray(image(3)), 3000
  rng = np.random.default_rng(1)
  for _ in range(n):
    augment.finetune(x, 16, rng)
  assert seen == {("ra", augment.FINETUNE_OPS, 2, 7): seen[("ra", augment.FINETUNE_OPS, 2, 7)]}
  assert abs(seen[("ra", augment.FINETUNE_OPS, 2, 7)] / n - 0.8) < 0.03
  seen.clear()
  sigmas = [augment.pretrain(x, 16, rng)[1] for _ in range(n)]
  share = lambda k: seen[k] / n
  assert abs(share("jitter") - 0.6) < 0.03 and abs(share("grayscale") - 0.1) < 0.02
  assert abs(share(("ra", augment.PRETRAIN_OPS, 2, 4)) - 0.8) < 0.03
  assert abs(np.mean(np.asarray(sigmas) > 0) - 0.3) < 0.03


@pytest.mark.parametrize("w,h", [(300, 100), (100, 300), (1076, 421), (97, 331)])
def test_crop_fallback_of_elongated_images_is_torchvisions(w, h):
  """Images too elongated for any try (here every one: more than about 2:1 at scale 0.6) take
  RandomResizedCrop's fallback, the central crop narrowed to the nearest allowed aspect ratio,
  as torchvision's get_params gives it. It was a square of the shorter side: a 3:1 image was
  only ever seen by its middle third."""
  import torchvision.transforms as T
  rng = np.random.default_rng(0)
  top, left, ch, cw = T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), (0.6, 1.0),
                                                     (3 / 4, 4 / 3))
  assert augment.crop_box(w, h, rng) == (left, top, left + cw, top + ch)
  assert 4 / 3 * 0.99 <= max(cw / ch, ch / cw) <= 4 / 3 * 1.01


def test_crops_that_fit_keep_the_scale_and_ratio_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = augment.crop_box(56, 40, rng)
    assert 0 <= left < right <= 56 and 0 <= top < bottom <= 40
    assert 0.6 * 0.9 <= (right - left) * (bottom - top) / (56 * 40) <= 1.0
    assert 3 / 4 * 0.9 <= (right - left) / (bottom - top) <= 4 / 3 * 1.1


def _jpeg(img: Image.Image) -> bytes:
  import io
  buffer = io.BytesIO()
  img.save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def test_a_grey_picture_is_augmented_as_one_band_with_the_same_pixels():
  """Grey pictures (equal bands: most radiology) are decoded from their stored bytes and
  augmented as one band, a third of the work: every op, every recipe, the same uint8 pixels
  as the same picture augmented in RGB (a PIL RGB image is taken as it is)."""
  grey = image(3).convert("L").convert("RGB")
  stored = _jpeg(grey)
  decoded = Image.open(__import__("io").BytesIO(stored)).convert("RGB")  # RGB, bands equal.
  assert augment.image(stored).mode == "L" and augment.image(np.asarray(decoded)).mode == "L"
  np.testing.assert_array_equal(np.asarray(augment.image(stored)),
                                np.asarray(decoded)[..., 0])
  assert augment.image(decoded) is decoded  # PIL: taken as it is, RGB.
  colour = image(4)
  assert augment.image(_jpeg(colour)).mode == "RGB"
  nearly = np.asarray(grey).copy()
  nearly[0, 0, 2] += 1  # One pixel off grey, away from the centre: still colour.
  assert augment.image(nearly).mode == "RGB"
  one_band = augment.image(stored)
  for name, op in augment._OPS.items():
    for m in (4, 7, 10):
      a, b = op(one_band, m, np.random.default_rng(m)), op(decoded, m, np.random.default_rng(m))
      np.testing.assert_array_equal(augment._pixels(a), np.asarray(b), err_msg=name)
  for seed in range(6):
    order, factors = np.random.default_rng(seed).permutation(4), (1.3, 0.7, 1.25, 0.08)
    np.testing.assert_array_equal(augment._pixels(augment.jitter(one_band, order, factors)),
                                  np.asarray(augment.jitter(decoded, order, factors)))
  for recipe in ("finetune", "pretrain", "test"):
    for seed in range(40):  # Enough draws to take every branch of both recipes.
      got = augment.AUGMENTATIONS[recipe](stored, 24, np.random.default_rng(seed))
      want = augment.AUGMENTATIONS[recipe](decoded, 24, np.random.default_rng(seed))
      assert got[0].shape == (24, 24, 3) and got[0].dtype == np.uint8
      np.testing.assert_array_equal(got[0], want[0], err_msg=f"{recipe} {seed}")
      assert got[1] == want[1]


def test_crops_are_drawn_as_torchvisions_are():
  """RandomResizedCrop's draw: up to 10 tries before the fallback (on a 56 x 40 picture about
  1% of crops fall back, as many as torchvision's get_params gives; with one try it was 62%),
  and the aspect ratio log-uniform in (3/4, 4/3) (uniform in the ratio, crops lean wide)."""
  import torchvision.transforms as T
  n, fallback = 20000, (1, 0, 54, 40)  # The central 53 x 40 (4:3) crop.
  rng = np.random.default_rng(0)
  ours = sum(augment.crop_box(56, 40, rng) == fallback for _ in range(n)) / n
  import torch
  torch.manual_seed(0)
  picture, theirs = Image.new("RGB", (56, 40)), 0
  for _ in range(n):
    top, left, h, w = T.RandomResizedCrop.get_params(picture, (0.6, 1.0), (3 / 4, 4 / 3))
    theirs += (left, top, left + w, top + h) == fallback
  assert 0.005 < theirs / n < 0.02 and abs(ours - theirs / n) < 0.004, (ours, theirs / n)
  # On a picture where every try fits, log(w / h) is uniform in (log 3/4, log 4/3).
  rng, top = np.random.default_rng(1), np.log(4 / 3)
  logs = []
  for _ in range(4000):
    left, upper, right, lower = augment.crop_box(1000, 1000, rng, scale=(0.05, 0.3))
    logs.append(np.log((right - left) / (lower - upper)))
  logs = np.sort(logs)
  uniform = (logs + top) / (2 * top)  # Its CDF at each draw.
  assert np.abs(uniform - np.arange(1, len(logs) + 1) / len(logs)).max() < 0.03
  assert abs(np.mean(logs)) < 0.01


def test_the_pretraining_flip_is_left_to_right_half_the_time(monkeypatch):
  """The pre-training view is mirrored (left to right), not turned upside down, for half of
  the views: with the other ops made identities, each view is the picture or its mirror."""
  for name in ("colour_jitter", "rand_augment"):
    monkeypatch.setattr(augment, name, lambda img, rng, *a, **k: img)
  monkeypatch.setattr(augment, "random_resized_crop", lambda img, size, rng, scale: img)
  monkeypatch.setattr(augment.ImageOps, "grayscale", lambda img: img)
  x = np.asarray(image(5, shape=(16, 16, 3)))
  rng, kept, mirrored, n = np.random.default_rng(0), 0, 0, 400
  for _ in range(n):
    out = augment.pretrain(x, 16, rng)[0]
    kept += np.array_equal(out, x)
    mirrored += np.array_equal(out, x[:, ::-1])
  assert kept + mirrored == n and abs(mirrored / n - 0.5) < 0.08


def test_colour_jitter_draws_torchvisions_ranges_in_every_order(monkeypatch):
  """ColorJitter(0.4, 0.4, 0.4, 0.1): brightness, contrast and saturation factors uniform in
  [0.6, 1.4], the hue shift uniform in [-0.1, 0.1], applied in any of the 24 orders."""
  drawn = []
  monkeypatch.setattr(augment, "jitter",
                      lambda img, order, factors: drawn.append((tuple(order), factors)) or img)
  rng = np.random.default_rng(0)
  for _ in range(3000):
    augment.colour_jitter(Image.new("RGB", (4, 4)), rng)
  assert len({order for order, _ in drawn}) == 24
  factors = np.array([f for _, f in drawn])
  for i, (low, high) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
    column = factors[:, i]
    assert low <= column.min() < low + 0.01 and high - 0.01 < column.max() <= high, i
    assert abs(column.mean() - (low + high) / 2) < 0.01 * (high - low) * 2, i


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_crop_is_resized_as_torchvisions_resized_crop(mode):
  """The crop's pixels are torchvision's (`resized_crop`: cut out, then resized bicubically),
  for the box `crop_box` draws. Resizing the box in place (PIL's `box=`) read the pixels
  around it into the crop's edge pixels (up to 12 grey levels off)."""
  img = image(6, shape=(60, 84, 3)).convert(mode)
  for seed in range(6):
    left, top, right, bottom = augment.crop_box(*img.size, np.random.default_rng(seed))
    ours = augment.random_resized_crop(img, 32, np.random.default_rng(seed))
    theirs = TF.resized_crop(img, top, left, bottom - top, right - left, [32, 32],
                             TF.InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=str(seed))


def test_the_recipes_crop_at_the_references_scales(monkeypatch):
  """Fine-tuning crops 60-100% of the picture's area, pre-training 70-100% (the reference's
  RandomResizedCrop scales)."""
  scales, real = [], augment.crop_box
  monkeypatch.setattr(augment, "crop_box",
                      lambda w, h, rng, scale, ratio: scales.append(scale) or real(w, h, rng,
                                                                                 scale, ratio))
  x = np.asarray(image(7))
  augment.finetune(x, 16, np.random.default_rng(0))
  augment.pretrain(x, 16, np.random.default_rng(0))
  assert scales == [(0.6, 1.0), (0.7, 1.0)]


def test_rotation_is_torchvisions_by_21_degrees_at_m7():
  """RandAugment's rotation at M=7: 30 x 7/10 = 21 degrees either way, bilinear, the corners
  grey: torchvision's rotate."""
  img, seen = image(8, shape=(48, 48, 3)), set()
  for seed in range(8):
    out = np.asarray(augment._OPS["rotate"](img, 7, np.random.default_rng(seed)))
    for angle in (21, -21):
      theirs = TF.rotate(img, angle, TF.InterpolationMode.BILINEAR, fill=[128, 128, 128])
      if np.array_equal(out, np.asarray(theirs)):
        seen.add(angle)
        break
    else:
      raise AssertionError(f"rotate is not torchvision's by 21 degrees (seed {seed})")
  assert seen == {21, -21}


@pytest.mark.parametrize("axis", ["x", "y"])
def test_shear_moves_along_its_axis_by_0_21_at_m7(axis):
  """shear_x slides each row sideways in proportion to its height (shear_y each column
  vertically), by 0.3 x 7/10 = 0.21 pixels per pixel, either way: a vertical edge (for
  shear_y a horizontal one) leans by that slope."""
  edge = np.zeros((48, 48, 3), np.uint8)
  edge[:, 24:] = 255  # Black left of x = 24, white right of it.
  if axis == "y":
    edge = edge.transpose(1, 0, 2).copy()  # Black above y = 24.
  slopes = set()
  for seed in range(8):
    out = np.asarray(augment._OPS[f"shear_{axis}"](Image.fromarray(edge), 7,
                                                   np.random.default_rng(seed)))[..., 0]
    if axis == "y":
      out = out.T
    # Per row, where it turns white: the first pixel right of the black run above 191.
    rows = np.arange(8, 40)
    at = [int(np.argmax((out[r] > 191) & (np.arange(48) > np.argmax(out[r] < 64))))
          for r in rows]
    slope = np.polyfit(rows, at, 1)[0]
    assert abs(abs(slope) - 0.21) < 0.03, (seed, slope)
    slopes.add(np.sign(slope))
  assert slopes == {1.0, -1.0}
