"""User images become RGB uint8 as the reference (OpenCV's default colour read) sees them."""

import os
import types

import numpy as np
import pytest
from PIL import Image

from evf_jax.images import ImageReadError, check_rgb_array, image_names, load_image, overlay, probe_image


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
  """The high byte, as OpenCV reads 16-bit PNGs (checked against cv2 4.x on all 65536 grey values: rounding
  value / 257 differed by 1 on a quarter of them); 16-bit RGB PNGs, which Pillow reads as 8-bit, agree too."""
  a = np.array([[0, 257 * 3, 65535, 256 * 100, 255, 256 * 7 + 255, 65280]], np.uint16)
  Image.fromarray(a).save(tmp_path / "d.png")
  got = load_image(str(tmp_path / "d.png"))
  np.testing.assert_array_equal(got[..., 0], [[0, 3, 255, 100, 0, 7, 255]])


def test_float_images(tmp_path):
  """32-bit float TIFFs (OpenCV's colour read returns nothing for them): values in 0-1 are scaled to 0-255 (they
  were rounded to 0 and 1: a black image), others are read as 0-255; NaN is 0."""
  unit = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
  Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
  np.testing.assert_array_equal(load_image(str(tmp_path / "unit.tif"))[..., 0], [[0, 128, 255, 51]])
  wide = np.array([[0.0, 0.5, 254.6, 300.0, np.nan, -3.0]], np.float32)
  Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
  np.testing.assert_array_equal(load_image(str(tmp_path / "wide.tif"))[..., 0], [[0, 0, 255, 255, 0, 0]])


def test_32_bit_integer_images(tmp_path):
  """Mode I (32-bit integer TIFFs): values up to 255 are 8-bit already; above, the 16-bit range's high byte."""
  for values, want in (([0, 100, 255], [0, 100, 255]), ([0, 256 * 100, 65535], [0, 100, 255])):
    Image.fromarray(np.array([values], np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as img:
      assert img.mode == "I"
    np.testing.assert_array_equal(load_image(str(tmp_path / "i.tif"))[..., 0], [want])


def test_cmyk_other_than_jpeg_is_not_inverted(tmp_path, rgb):
  """Only libjpeg's CMYK is Adobe-inverted (`test_cmyk_jpeg_as_opencv`); a CMYK TIFF converts as Pillow does."""
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tif")
  with Image.open(tmp_path / "c.tif") as img:
    want = np.asarray(img.convert("RGB"))
  np.testing.assert_array_equal(load_image(str(tmp_path / "c.tif")), want)


def test_a_directory_s_images_by_extension_in_any_case(tmp_path):
  for name in ("a.JPG", "b.png", "c.Jpeg", "d.webp", ".e.jpg", "f.txt", "g.tif"):
    (tmp_path / name).write_bytes(b"")
  assert sorted(image_names(str(tmp_path))) == ["a.JPG", "b.png", "c.Jpeg", "d.webp"]


def test_cmyk_jpeg_as_opencv(tmp_path):
  """CMYK JPEGs (a few COCO images are) as OpenCV converts libjpeg's Adobe-inverted CMYK: red = k - ((255 - c) *
  k >> 8) on the inverted values (checked against cv2 4.x on random CMYK, EXIF-rotated too); Pillow's own
  conversion is 1-2 levels off on most pixels."""
  rng = np.random.default_rng(1)
  cmyk = Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), mode="CMYK")
  cmyk.save(tmp_path / "c.jpg", "JPEG", quality=90)
  stored = np.asarray(Image.open(tmp_path / "c.jpg")).astype(np.int64)  # Pillow's (un-inverted) CMYK
  c, k = 255 - stored[..., :3], 255 - stored[..., 3:]  # libjpeg's
  want = k - (((255 - c) * k) >> 8)
  got = load_image(str(tmp_path / "c.jpg"))
  np.testing.assert_array_equal(got, want)
  assert (np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")) != want).mean() > 0.5  # Pillow's differs


def test_overlay_takes_bool_and_number_masks(rgb):
  """A 0/1 or 0/255 mask (as the mask PNGs hold) paints the masked pixels; used as an index it painted rows."""
  mask = np.zeros((20, 30), bool)
  mask[5:9, 10:20] = True
  want = overlay(rgb, mask)
  assert (want != rgb).any(axis=-1)[~mask].sum() == 0 and (want[mask] != rgb[mask]).any()
  for m in (mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(np.float32)):
    np.testing.assert_array_equal(overlay(rgb, m), want)
  with pytest.raises(ValueError, match=r"the mask is \(1, 20, 30\), the image \(20, 30, 3\)"):
    overlay(rgb, mask[None])


def test_exif_orientation(tmp_path, rgb):
  img = Image.fromarray(rgb)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 CW to display
  img.save(tmp_path / "r.jpg", exif=exif, quality=100)
  got = load_image(str(tmp_path / "r.jpg"))
  assert got.shape == (30, 20, 3)
  # probe_image, as stored and as shown; orientations 5-8 turn the image a quarter, 2-4 do not.
  for orientation, shown in ((2, (20, 30)), (3, (20, 30)), (5, (30, 20)), (6, (30, 20)), (7, (30, 20)), (8, (30, 20))):
    exif[0x0112] = orientation
    img.save(tmp_path / f"o{orientation}.jpg", exif=exif)
    path = str(tmp_path / f"o{orientation}.jpg")
    assert probe_image(path) == (20, 30) and probe_image(path, oriented=True) == shown == load_image(path).shape[:2]


def test_array_checks(rgb):
  check_rgb_array(rgb)
  for bad in (rgb[..., 0], rgb.astype(np.float32), rgb[:0]):
    with pytest.raises(ImageReadError):
      check_rgb_array(bad)


def test_one_decoder_for_predict_and_prepared_data(tmp_path):
  """The same files through `run.py predict`'s path (load_image on the file) and through `prepare` (TFDS) -> the
  record's bytes -> the pipeline's example: the same pixels, for CMYK JPEG, EXIF-rotated JPEG, 16-bit PNG and
  palette PNG with transparency (the annotations state each image's size as displayed)."""
  from data_pipelines import prepare, sources, transforms
  from evf_jax.images import decode_image
  from evf_jax.sam.transforms import to_frame
  from evf_testing import data_fixtures as F
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco", corrupt=False)
  image_dir = os.path.join(src, "images/mscoco/images/train2014")
  path = {i: os.path.join(image_dir, f"COCO_train2014_{i:012d}.jpg") for i in F.REFER_IMAGES}
  rng = np.random.default_rng(3)
  h, w = F.REFER_IMAGES[1]
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("CMYK").save(path[1], "JPEG")
  h, w = F.REFER_IMAGES[2]
  rotated = Image.fromarray(rng.integers(0, 256, (w, h, 3), dtype=np.uint8))  # stored sideways ...
  exif = rotated.getexif()
  exif[0x0112] = 6  # ... displayed rotated by 90 degrees: h x w
  rotated.save(path[2], "JPEG", exif=exif)
  h, w = F.REFER_IMAGES[3]
  Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(path[3], "PNG")
  h, w = F.REFER_IMAGES[4]
  pal = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(8)
  pal.info["transparency"] = 0
  pal.save(path[4], "PNG", transparency=0)

  summary = prepare.build("refcoco", str(tmp_path / "tfds"), src, progress=False)
  assert summary["skipped"] == {}
  cfg = transforms.SampleConfig(sam_size=64, beit_size=32)
  seen = set()
  for split in summary["splits"]:
    source = sources.open_split(str(tmp_path / "tfds" / "refcoco"), split)
    for rec in (source[i] for i in range(len(source))):
      image_id = int(rec.image_id)
      from_file = load_image(path[image_id])
      assert from_file.shape[:2] == F.REFER_IMAGES[image_id] == (rec.h, rec.w)
      np.testing.assert_array_equal(decode_image(rec.image), from_file)
      example = transforms.eval_example(rec, types.SimpleNamespace(encode=lambda text: [0, 2]), cfg)
      np.testing.assert_array_equal(example["sam_image"], to_frame(from_file, 64)[0])
      seen.add(image_id)
  assert seen == set(F.REFER_IMAGES)


def test_probe_reads_the_header_only(tmp_path, rgb, monkeypatch):
  """`probe_image` (predict's check of every file before the model loads): sizes as stored, pixel data cut off
  passes it and fails at `load_image`, and a decompression bomb is one error, also from its header alone."""
  path = tmp_path / "img.png"
  Image.fromarray(rgb).save(path)
  assert probe_image(str(path)) == rgb.shape[:2]
  cut = tmp_path / "cut.png"
  cut.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  assert probe_image(str(cut)) == rgb.shape[:2]
  with pytest.raises(ImageReadError, match="cannot decode image"):
    load_image(str(cut))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses above twice this from the header
  for read in (probe_image, load_image):
    with pytest.raises(ImageReadError, match="cannot decode image .*img.png"):
      read(str(path))
