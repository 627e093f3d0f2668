"""The pre-training blur on device: the Gaussian formula, per-view sigmas, PIL's blur."""

import jax
import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from medvqa_jax import ASSETS
from medvqa_jax.data import augment, device_augment


def _photo(size=96):
  """A real radiograph from the bundled sample (smooth regions and edges, unlike noise)."""
  path = sorted((ASSETS / "vqa_rad_sample" / "images").glob("*.jpg"))[0]
  return np.asarray(Image.open(path).convert("RGB").resize((size, size)))


def test_blur_is_the_gaussian_formula_with_each_views_sigma():
  rng = np.random.default_rng(0)
  images = np.stack([_photo(), rng.integers(0, 256, (96, 96, 3), np.uint8), _photo()[::-1],
                     rng.integers(0, 256, (96, 96, 3), np.uint8)])
  sigma = np.float32([2.0, 0.7, 0.1, 0.0])
  out = np.asarray(jax.jit(device_augment.gaussian_blur)(images, sigma))
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out[3], images[3])  # Sigma 0: not blurred.
  for i in range(3):
    # Float64 reference, same cut (4 sigma of the largest sigma) and edge-replicating borders.
    ref = ndimage.gaussian_filter(images[i].astype(np.float64), (sigma[i], sigma[i], 0),
                                  mode="nearest", truncate=4.0 * 2.0 / sigma[i])
    ref = np.round(np.clip(ref, 0, 255))
    diff = np.abs(out[i].astype(int) - ref)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (i, diff.max())  # Rounding ties.
  assert np.abs(out[1].astype(int) - images[1]).mean() > 10  # A sigma of 0.7 blurs noise.


def test_blur_commutes_with_the_hosts_flip():
  """The host flips before the device blurs; PIL blurred first. Same image either way."""
  x = _photo()[None]
  sigma = np.float32([1.3])
  np.testing.assert_array_equal(device_augment.gaussian_blur(x[:, :, ::-1], sigma),
                                np.asarray(device_augment.gaussian_blur(x, sigma))[:, :, ::-1])


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_matches_pils_away_from_the_border(sigma):
  """What the host pipeline did before (PIL's blur, a box-filter approximation of the same
  Gaussian) and what the device does now agree to a grey level or two inside the image."""
  x = _photo()
  pil = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=sigma)))
  dev = np.asarray(device_augment.gaussian_blur(x[None], np.float32([sigma])))[0]
  inner = np.abs(pil.astype(int) - dev)[8:-8, 8:-8]
  assert inner.max() <= 3 and inner.mean() < 0.6, (inner.max(), inner.mean())


def test_pretrain_views_leave_the_blur_to_the_device():
  x = _photo(64)
  sigmas = [augment.pretrain(x, 32, np.random.default_rng(s))[1] for s in range(400)]
  drawn = [s for s in sigmas if s > 0]
  assert 0.22 < len(drawn) / len(sigmas) < 0.38  # 30% of the views.
  assert augment.BLUR_SIGMA[0] <= min(drawn) and max(drawn) <= augment.BLUR_SIGMA[1]
  assert device_augment.RADIUS >= 4 * augment.BLUR_SIGMA[1]


def test_views_applies_the_batch_blur_or_none():
  x = np.stack([_photo(32), _photo(32)[::-1]])
  np.testing.assert_array_equal(device_augment.views({"images": x}), x)
  blurred = device_augment.views({"images2": x, "blur2": np.float32([0.0, 1.5])},
                                 "images2", "blur2")
  np.testing.assert_array_equal(blurred[0], x[0])
  np.testing.assert_array_equal(blurred[1],
                                device_augment.gaussian_blur(x[1:], np.float32([1.5]))[0])
  assert not np.array_equal(blurred[1], x[1])
