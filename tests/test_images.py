"""User images become RGB uint8 as the reference (OpenCV's default colour read) sees them."""

import numpy as np
import pytest
from PIL import Image

from evf_jax.images import ImageReadError, check_rgb_array, load_image


@pytest.fixture
def rgb():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext,lossless", [("png", True), ("bmp", True), ("webp", False), ("jpg", False)])
def test_formats(tmp_path, rgb, ext, lossless):
  p = tmp_path / f"a.{ext}"
  Image.fromarray(rgb).save(p, **({"lossless": True} if ext == "webp" else {}))
  got = load_image(str(p))
  assert got.shape == (20, 30, 3) and got.dtype == np.uint8
  if lossless or ext == "webp":
    np.testing.assert_array_equal(got, rgb)


def test_grayscale_rgba_palette(tmp_path, rgb):
  gray = rgb[..., 0]
  Image.fromarray(gray).save(tmp_path / "g.png")
  np.testing.assert_array_equal(load_image(str(tmp_path / "g.png")), np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), rgb)  # alpha dropped, as OpenCV
  pal = Image.fromarray(rgb).quantize(16)
  pal.save(tmp_path / "p.png")
  np.testing.assert_array_equal(load_image(str(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))


def test_16_bit(tmp_path):
  a = np.array([[0, 257 * 3, 65535, 256 * 100]], np.uint16)
  Image.fromarray(a).save(tmp_path / "d.png")
  got = load_image(str(tmp_path / "d.png"))
  np.testing.assert_array_equal(got[..., 0], [[0, 3, 255, 100]])


def test_exif_orientation(tmp_path, rgb):
  img = Image.fromarray(rgb)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 CW to display
  img.save(tmp_path / "r.jpg", exif=exif, quality=100)
  got = load_image(str(tmp_path / "r.jpg"))
  assert got.shape == (30, 20, 3)


def test_array_checks(rgb):
  check_rgb_array(rgb)
  for bad in (rgb[..., 0], rgb.astype(np.float32), rgb[:0]):
    with pytest.raises(ImageReadError):
      check_rgb_array(bad)
