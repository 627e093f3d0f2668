"""Image decoding (medvqa_jax/data/image.py) of the modes medical images come in."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from medvqa_jax.data import builders
from medvqa_jax.data import image as image_lib


def sixteen_bit_png(path, top=4095, bottom=0):
  """A 12-bit ramp stored as a 16-bit PNG (as scans exported from DICOM often are)."""
  ramp = np.linspace(bottom, top, 64 * 48).reshape(48, 64).astype(np.uint16)
  Image.fromarray(ramp).save(path)
  with Image.open(path) as img:
    assert img.mode.startswith("I;16") or img.mode == "I"
  return ramp


def test_sixteen_bit_grayscale_is_stretched_not_clipped(tmp_path):
  ramp = sixteen_bit_png(tmp_path / "scan.png")
  rgb = np.asarray(image_lib.open_image(tmp_path / "scan.png"))
  assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
  expected = np.round(ramp / 4095 * 255).astype(np.uint8)
  np.testing.assert_array_equal(rgb[..., 0], expected)
  assert (rgb == rgb[..., :1]).all()
  # PIL's own conversion, which this replaces, clips nearly everything to white.
  with Image.open(tmp_path / "scan.png") as img:
    assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9
  # Stretched from the image's own minimum, not from 0.
  ramp = sixteen_bit_png(tmp_path / "raised.png", bottom=1000)
  rgb = np.asarray(image_lib.open_image(tmp_path / "raised.png"))
  np.testing.assert_array_equal(rgb[..., 0], np.round((ramp - 1000.0) / 3095 * 255))


def test_built_datasets_store_sixteen_bit_images_stretched(tmp_path):
  ramp = sixteen_bit_png(tmp_path / "scan.png")
  stored = Image.open(io.BytesIO(builders.encode_image(tmp_path / "scan.png", None)))
  assert stored.mode == "L"  # Grey, stored as its one band.
  expected = ramp / 4095 * 255
  assert np.abs(np.asarray(stored) - expected).mean() < 2  # JPEG round trip.


def _deep_png(arr: np.ndarray, orientation: int | None = None) -> bytes:
  """A PNG of 16-bit samples (H, W, C): C=3 RGB, C=2 gray + alpha, with an EXIF orientation
  chunk if given."""
  import struct
  import zlib

  import png
  h, w, c = arr.shape
  out = io.BytesIO()
  png.Writer(w, h, greyscale=c < 3, alpha=c in (2, 4), bitdepth=16).write(
      out, arr.reshape(h, w * c))
  data = out.getvalue()
  if orientation is None:
    return data
  exif = Image.Exif()
  exif[0x0112] = orientation
  body = exif.tobytes()
  chunk = (struct.pack(">I", len(body)) + b"eXIf" + body +
           struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF))
  return data[:33] + chunk + data[33:]  # After the signature and IHDR.


def test_sixteen_bit_colour_and_gray_alpha_pngs_are_read_in_full():
  """PIL keeps only the high byte of 16-bit RGB and gray + alpha PNGs: 12-bit content came out
  near black (max 15). They are read in full and stretched as 16-bit grayscale is, and
  turned by their EXIF orientation; the stored copy of a build is the same picture."""
  ramp = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)
  expected = np.round(ramp / 4095 * 255).astype(np.uint8)
  for arr in (np.stack([ramp] * 3, -1), np.stack([ramp, np.full_like(ramp, 65535)], -1)):
    data = _deep_png(arr)
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).max() <= 15  # PIL's.
    rgb = np.asarray(image_lib.open_image(data))
    np.testing.assert_array_equal(rgb, np.stack([expected] * 3, -1))
    stored = np.asarray(image_lib.open_image(builders.encode_image(data, None)))
    assert np.abs(stored.astype(float) - rgb).mean() < 2  # JPEG round trip.
  # Colour is kept (one range for the three channels) and the orientation applied.
  colour = np.stack([ramp, ramp // 2, np.zeros_like(ramp)], -1)
  turned = np.asarray(image_lib.open_image(_deep_png(colour, orientation=6)))
  assert turned.shape == (64, 48, 3)
  np.testing.assert_array_equal(turned[..., 0], np.rot90(expected, -1))
  np.testing.assert_array_equal(turned[..., 1], np.rot90(np.round(
      (ramp // 2) / 4095 * 255).astype(np.uint8), -1))


def test_float_and_constant_images():
  x = np.float32([[0.0, 0.5], [1.0, 0.25]])
  rgb = np.asarray(image_lib.to_rgb(Image.fromarray(x, "F")))
  np.testing.assert_array_equal(rgb[..., 1], np.uint8([[0, 128], [255, 64]]))
  flat = Image.fromarray(np.full((4, 4), 700, np.int32), "I")
  assert (np.asarray(image_lib.to_rgb(flat)) == 0).all()
  # The range is the finite samples': one NaN or inf made the whole image black.
  for bad in (np.nan, np.inf):
    y = x.copy()
    y[1, 1] = bad  # Was 0.25; the range stays 0-1.
    np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(Image.fromarray(y, "F")))[..., 0],
                                  np.uint8([[0, 128], [255, 0]]))


def test_transparent_images_are_composited_onto_white(tmp_path):
  """A black drawing on transparent black (how figures are often saved) came out one flat
  black: the alpha was dropped. It is composited onto white, as a page shows it, in 8-bit
  modes, palette transparency and 16-bit PNGs with alpha, and so stored by a build."""
  drawing = np.zeros((8, 8, 4), np.uint8)
  drawing[2:6, 2:6, 3] = 255  # An opaque black square; the rest transparent black.
  want = np.full((8, 8, 3), 255, np.uint8)
  want[2:6, 2:6] = 0
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(Image.fromarray(drawing, "RGBA"))),
                                want)
  np.testing.assert_array_equal(
      np.asarray(image_lib.to_rgb(Image.fromarray(drawing[..., 2:], "LA"))), want)
  half = Image.new("RGBA", (3, 3), (10, 20, 30, 40))  # 40/255 of the colour, the rest white.
  expected = [round(c * 40 / 255 + 255 * (1 - 40 / 255)) for c in (10, 20, 30)]
  assert np.asarray(image_lib.to_rgb(half))[0, 0].tolist() == expected
  palette = Image.fromarray(drawing[..., 3] // 255, "P")
  palette.putpalette([0, 0, 0] * 256)
  palette.info["transparency"] = 0  # Index 0 transparent, index 1 black.
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(palette)), want)
  Image.fromarray(drawing, "RGBA").save(tmp_path / "figure.png")
  stored = np.asarray(image_lib.open_image(builders.encode_image(tmp_path / "figure.png", None)))
  assert np.abs(stored.astype(int) - want).max() < 40  # JPEG round trip of a sharp edge.
  assert stored[0, 0].min() > 240 and stored[4, 4].max() < 15
  deep = np.zeros((8, 8, 2), np.uint16)
  deep[..., 0] = np.arange(64).reshape(8, 8) * 1000
  deep[2:6, 2:6, 1] = 65535
  gray = np.round(deep[..., 0] / 63000 * 255)
  np.testing.assert_array_equal(np.asarray(image_lib.open_image(_deep_png(deep)))[..., 1],
                                np.where(deep[..., 1] > 0, gray, 255).astype(np.uint8))
  # 16-bit gray with a transparent grey level (tRNS): that level was left black.
  Image.fromarray(deep[..., 0]).save(tmp_path / "keyed.png", transparency=0)
  keyed = np.asarray(image_lib.to_rgb(Image.open(tmp_path / "keyed.png")))
  assert keyed[0, 0].tolist() == [255] * 3 and keyed[7, 7].tolist() == [255] * 3  # 63000: max.
  assert keyed[0, 1].tolist() == [round(1000 / 63000 * 255)] * 3


def _tiff_rgb16(arr: np.ndarray) -> bytes:
  """A baseline little-endian TIFF of 16-bit RGB samples (H, W, 3), one uncompressed strip
  (PIL does not write them)."""
  import struct
  h, w, _ = arr.shape
  pixels = arr.astype("<u2").tobytes()
  bits_at, pixels_at = 8, 14
  tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
          (273, 4, 1, pixels_at), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)),
          (284, 3, 1, 1)]
  out = b"II*\x00" + struct.pack("<I", pixels_at + len(pixels)) + struct.pack("<3H", 16, 16, 16)
  out += pixels + struct.pack("<H", len(tags))
  for tag, kind, count, value in tags:
    packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
    out += struct.pack("<HHI", tag, kind, count) + packed
  return out + struct.pack("<I", 0)


def test_a_sixteen_bit_colour_tiff_is_refused_not_darkened(tmp_path):
  """PIL reads a 16-bit colour TIFF's high bytes only (12-bit content: max 15, near black) and
  says nothing; decoding and building now refuse it, naming the file."""
  ramp = np.linspace(0, 4095, 48 * 64).reshape(48, 64).astype(np.uint16)
  data = _tiff_rgb16(np.stack([ramp, ramp // 2, ramp // 4], -1))
  assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).max() <= 15  # PIL's.
  (tmp_path / "scan.tif").write_bytes(data)
  with pytest.raises(ValueError, match=r"scan.tif: a TIFF of 16-bit colour samples"):
    image_lib.open_image(tmp_path / "scan.tif")
  with pytest.raises(ValueError, match=r"unreadable image \(a TIFF of 16-bit colour"):
    builders.encode_image(tmp_path / "scan.tif", None)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "plain.tif")  # 8-bit: read.
  assert np.asarray(image_lib.open_image(tmp_path / "plain.tif")).shape == (4, 4, 3)


def test_exif_orientation_is_applied_when_decoding_and_building(tmp_path):
  # Stored 80 wide and 40 high, tagged "turn 90 degrees clockwise to view" (6): seen 40 x 80.
  stored = np.zeros((40, 80, 3), np.uint8)
  stored[:, :40] = 255  # The left half white.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "photo.jpg", "JPEG", exif=exif, quality=100)
  seen = np.asarray(image_lib.open_image(tmp_path / "photo.jpg"))
  assert seen.shape == (80, 40, 3)
  assert seen[:35].mean() > 250 and seen[45:].mean() < 5  # The white half is now on top.
  built = builders.encode_image(tmp_path / "photo.jpg", None)
  np.testing.assert_allclose(np.asarray(image_lib.open_image(built)), seen, atol=8)
  assert not image_lib.needs_turning(Image.open(io.BytesIO(built)))
  # An upright RGB JPEG is still kept byte for byte.
  Image.fromarray(stored).save(tmp_path / "plain.jpg", "JPEG")
  assert builders.encode_image(tmp_path / "plain.jpg", None) == (tmp_path / "plain.jpg").read_bytes()


def test_an_image_over_pils_pixel_limit_is_an_error_naming_it(tmp_path, monkeypatch):
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "huge.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice the limit.
  says = (r"Image size \(4096 pixels\) exceeds limit of 2000 pixels: too large for PIL to "
          r"open. Shrink the file first, or raise the limit \(PIL.Image.MAX_IMAGE_PIXELS\)")
  with pytest.raises(ValueError, match=rf"cannot decode \S*huge.png: {says}"):
    image_lib.open_image(tmp_path / "huge.png")
  # In a build, a bad record (skipped and reported), not a crash of the whole build.
  with pytest.raises(ValueError, match=rf"unreadable image \({says}"):
    builders.encode_image(tmp_path / "huge.png", 32)


def test_a_deep_png_with_alpha_and_significant_bits_is_not_washed_out():
  """A 16-bit PNG with alpha that states its significant bits (sBIT: 12-bit data) was read at
  those bits, alpha too (opaque: 4095), and then taken as 4095/65535 opaque: stored near
  white (239-255). It is stored as the same picture without alpha is."""
  import png
  ramp = np.linspace(0, 4095, 8 * 16).reshape(8, 16).astype(np.uint16)
  plain = np.asarray(image_lib.open_image(_deep_png(ramp[..., None] * 16)))
  for grey in (True, False):
    planes = [ramp] * (1 if grey else 3) + [np.full_like(ramp, 4095)]
    out = io.BytesIO()
    png.Writer(16, 8, greyscale=grey, alpha=True, bitdepth=12).write(
        out, np.stack(planes, -1).reshape(8, -1))
    data = out.getvalue()
    assert data[24] == 16 and b"sBIT" in data  # Stored as 16 bits, 12 of them significant.
    np.testing.assert_array_equal(np.asarray(image_lib.open_image(data)), plain)
  assert plain.min() == 0 and plain.max() == 255


def test_a_deep_tiff_whose_white_is_zero_is_not_inverted(tmp_path):
  """PIL inverts an 8-bit "white is zero" TIFF (photometric interpretation 0: ImageJ's
  inverted lookup table, MONOCHROME1 radiographs) as it decodes it, not a 16-bit or 32-bit
  one, which was stored as its negative; also turned by an EXIF orientation."""
  ramp = np.linspace(0, 4095, 8 * 16).reshape(8, 16).astype(np.uint16)
  want = 255 - np.round(ramp / 4095 * 255).astype(np.uint8)
  Image.fromarray(ramp).save(tmp_path / "inverted.tif", tiffinfo={262: 0})
  with Image.open(tmp_path / "inverted.tif") as img:
    assert img.mode.startswith("I;16") and img.tag_v2[262] == 0
  np.testing.assert_array_equal(np.asarray(image_lib.open_image(tmp_path / "inverted.tif"))[..., 0],
                                want)
  Image.fromarray(ramp).save(tmp_path / "turned.tif", tiffinfo={262: 0, 274: 3})
  turned = np.asarray(image_lib.open_image(tmp_path / "turned.tif"))[..., 0]
  np.testing.assert_array_equal(turned, want[::-1, ::-1])  # Orientation 3: half a turn.
  Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif", tiffinfo={262: 0})
  np.testing.assert_array_equal(np.asarray(image_lib.open_image(tmp_path / "float.tif"))[..., 0],
                                want)
  stored = np.asarray(Image.open(io.BytesIO(builders.encode_image(tmp_path / "inverted.tif",
                                                                   None))))
  assert np.abs(stored.astype(int) - want).mean() < 2  # JPEG round trip; grey: one band.
  Image.fromarray(ramp).save(tmp_path / "plain.tif")  # Black is zero: as it was.
  np.testing.assert_array_equal(np.asarray(image_lib.open_image(tmp_path / "plain.tif"))[..., 0],
                                255 - want)


def test_an_alpha_of_zero_everywhere_is_ignored():
  """Nothing of an image whose alpha is 0 everywhere would be seen (an exporter's mistake):
  it was stored one flat white. Its colours are kept, as PIL's conversion keeps them."""
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., 0] = np.arange(24).reshape(4, 6) * 10
  for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., [0, 3]], "LA")):
    np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(img)),
                                  np.asarray(img.convert("RGB")))
  deep = np.zeros((4, 6, 2), np.uint16)
  deep[..., 0] = np.arange(24).reshape(4, 6) * 1000
  np.testing.assert_array_equal(np.asarray(image_lib.open_image(_deep_png(deep)))[..., 0],
                                np.round(deep[..., 0] / 23000 * 255).astype(np.uint8))


def test_files_that_are_no_pictures_say_what_they_are(tmp_path):
  """An empty file, a DICOM file and an image over PIL's pixel limit were "not an image format
  PIL can read", "not an image format" and a warning of a "decompression bomb DOS attack";
  a folder given as an image was "no such file"."""
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0" * 50)
  for name, says in (("empty.jpg", r"an empty file \(0 bytes\)"),
                     ("scan.dcm", r"a DICOM file, which is not read here: export its pixels")):
    with pytest.raises(ValueError, match=rf"cannot decode \S*{name}: {says}"):
      image_lib.open_image(tmp_path / name)
    with pytest.raises(ValueError, match=rf"unreadable image \({says}"):
      builders.encode_image(tmp_path / name, 32)
  with pytest.raises(ValueError, match=r"\S+ is a folder, not an image file"):
    image_lib.open_image(tmp_path)
  with pytest.raises(ValueError, match=r"cannot decode \S*gone.png: \[Errno 2\]"):
    image_lib.open_image(tmp_path / "gone.png")  # As before: not a bare FileNotFoundError.
  with pytest.raises(ValueError, match=r"a folder, not an image file"):
    builders.encode_image(tmp_path, 32)


def test_a_large_scan_under_pils_limit_opens_without_a_warning(tmp_path, monkeypatch):
  import warnings
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "large.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4,096 pixels: warned of, not refused.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert np.asarray(image_lib.open_image(tmp_path / "large.png")).shape == (64, 64, 3)
    builders.encode_image(tmp_path / "large.png", 32)


def test_load_image_reads_the_whole_picture_into_the_towers_square(tmp_path):
  """README's `load_image(path, size)`: the whole picture (no crop), upright RGB, resized to
  size x size by PIL's bicubic, uint8; a grey picture as three equal bands."""
  rng = np.random.default_rng(0)
  colour = Image.fromarray(rng.integers(0, 256, (30, 50, 3), np.uint8))
  colour.save(tmp_path / "wide.png")
  grey = Image.fromarray(rng.integers(0, 256, (40, 20), np.uint8))
  grey.save(tmp_path / "tall.png")
  for name, img in (("wide.png", colour), ("tall.png", grey)):
    got = image_lib.load_image(tmp_path / name, 32)
    want = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="no-such.png"):
    image_lib.load_image(tmp_path / "no-such.png", 32)


def test_only_the_first_frame_of_a_multi_frame_file_is_stored_and_that_is_said(tmp_path,
                                                                                caplog):
  """A multi-page TIFF or an animated GIF or PNG was stored as its first frame without a
  word; the build now warns, naming the file. A camera's MPO, whose first frame is the
  picture (the others previews or the second eye), is stored so quietly."""
  red = Image.new("RGB", (30, 20), (200, 10, 10))
  green = Image.new("RGB", (30, 20), (10, 200, 10))
  for fmt, suffix in (("TIFF", "tif"), ("GIF", "gif"), ("PNG", "png"), ("MPO", "jpg")):
    path = tmp_path / f"frames.{suffix}"
    red.save(path, fmt, save_all=True, append_images=[green])
    assert Image.open(path).n_frames == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvqa_jax.data.builders"):
      stored = np.asarray(Image.open(io.BytesIO(builders.encode_image(path, None))))
    assert np.abs(stored[5, 5].astype(int) - [200, 10, 10]).max() <= 3, fmt  # The first.
    said = [r.getMessage() for r in caplog.records]
    assert said == ([] if fmt == "MPO" else
                    [f"{path} holds 2 frames ({fmt}): only the first is stored"]), fmt
  red.save(tmp_path / "one.gif")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="medvqa_jax.data.builders"):
    builders.encode_image(tmp_path / "one.gif", None)
  assert not caplog.records

