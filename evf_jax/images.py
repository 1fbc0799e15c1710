"""The one image decoder: files and encoded bytes -> RGB uint8 (H, W, 3), the way the reference sees them.

`predict` (`load_image`), `prepare`, the training pipeline and evaluation (`decode_image` on the stored bytes)
all decode through `_decode`, so a file gives the same pixels on every path. The reference reads images with
OpenCV's default colour mode, so we follow its conventions: EXIF orientation applied, alpha dropped (not
composited), palette, grayscale and CMYK converted to RGB, 16-bit samples scaled to 8 bits. Every way a file can
be unusable is an `ImageReadError` (a `UserError`) naming the file.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from evf_jax.errors import UserError, first_line

SUPPORTED = "JPEG, PNG, WebP, BMP (and anything else Pillow reads)"
FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what a directory of images is read for


def image_names(directory: str) -> list[str]:
  """The entries of `directory` named as images (`FILE_EXTENSIONS`, any case), hidden ones (macOS's `._x.jpg`)
  left out; not checked to be files. OSError when it cannot be listed."""
  return [n for n in os.listdir(directory) if os.path.splitext(n)[1].lower() in FILE_EXTENSIONS
          and not n.startswith(".")]


class ImageReadError(UserError, ValueError):
  pass


def to_rgb_uint8(img, jpeg_cmyk: bool = False) -> np.ndarray:
  """A PIL image of any mode -> RGB uint8 (H, W, 3). Floating-point images (mode F, e.g. 32-bit TIFFs, which
  OpenCV's colour read cannot open) are taken as 0-1 when no value exceeds 1 (the usual convention for float
  images; rounded as 0-255 they would be nearly black), else as 0-255; NaN becomes 0. `jpeg_cmyk`: a CMYK image
  decoded from a JPEG, converted as OpenCV converts libjpeg's (Adobe-inverted) CMYK."""
  mode = img.mode
  if mode == "CMYK" and jpeg_cmyk:
    # Pillow un-inverts Adobe CMYK (libjpeg's c = 255 - C); OpenCV's red is k - ((255 - c) * k >> 8) on libjpeg's
    # values. Pillow's own conversion is 1 level off on most pixels (some COCO images are CMYK JPEGs).
    a = np.asarray(img, np.int32)
    k = 255 - a[..., 3:]
    return (k - ((a[..., :3] * k) >> 8)).astype(np.uint8)
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img).astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
      a = np.floor(a / 256.0)  # 16-bit range onto 8 bits: the high byte, as OpenCV's read (and Pillow's for RGB)
    if mode == "F":
      a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
      if a.max(initial=0) <= 1.0:
        a = a * 255.0
    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if mode in ("RGBA", "LA", "PA", "P", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
    if mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")
    img = img.convert("RGB")
  elif mode != "RGB":
    img = img.convert("RGB")
  if not isinstance(img, Image.Image):
    raise TypeError(type(img))
  return np.asarray(img, dtype=np.uint8).copy()


@contextlib.contextmanager
def _opened(source: Union[str, BinaryIO], what: str) -> Iterator[Image.Image]:
  """Pillow's image of `source` (a path or an open file, header read); whatever Pillow raises while it is open,
  decoding included, becomes an ImageReadError naming `what`."""
  try:
    with Image.open(source) as img:
      yield img
  except UnidentifiedImageError:
    raise ImageReadError(f"not an image (supported: {SUPPORTED}): {what}") from None
  except ImageReadError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, a bomb
    raise ImageReadError(f"cannot decode image {what}: {first_line(e)}") from None


def _check_size(img: Image.Image, what: str) -> None:
  if img.width == 0 or img.height == 0:
    raise ImageReadError(f"image has zero size ({img.width}x{img.height}): {what}")


def _decode(source: BinaryIO, what: str) -> np.ndarray:
  """Decodes an open image file (any mode) into RGB uint8 (H, W, 3), EXIF orientation applied."""
  with _opened(source, what) as img:
    img.load()  # decode now, so a truncated file fails here and not later
    _check_size(img, what)
    return to_rgb_uint8(ImageOps.exif_transpose(img), jpeg_cmyk=img.mode == "CMYK" and img.format == "JPEG")


def decode_image(data: bytes, what: str = "image bytes") -> np.ndarray:
  """Encoded image bytes (as stored in prepared records) -> RGB uint8 (H, W, 3); `what` names it in errors."""
  return _decode(io.BytesIO(data), what)


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise ImageReadError(f"image not found: {path}")
  if os.path.isdir(path):
    raise ImageReadError(f"expected an image file, got a directory: {path}")
  if os.path.getsize(path) == 0:
    raise ImageReadError(f"image file is empty (0 bytes): {path}")


def load_image(path: str) -> np.ndarray:
  """Reads an image file into RGB uint8 (H, W, 3), EXIF orientation applied."""
  _check_file(path)
  try:
    f = open(path, "rb")
  except OSError as e:  # unreadable (permissions), or gone since the check
    raise ImageReadError(f"cannot open image {path}: {e.strerror or first_line(e)}") from None
  with f:
    return _decode(f, path)


def probe_image(path: str, oriented: bool = False) -> tuple[int, int]:
  """(height, width) from the file's header without decoding the pixels: a missing, empty or unknown file fails
  here; corrupt pixel data only when `load_image` decodes it. As stored, or with `oriented` as `load_image`
  returns it (EXIF orientations 5-8 swap the sides; a PNG's EXIF after its pixel data is not read, since that
  decodes the file: such an image keeps its stored size)."""
  _check_file(path)
  with _opened(path, path) as img:
    _check_size(img, path)
    return (img.width, img.height) if oriented and _turned(img) else (img.height, img.width)


def _turned(img: Image.Image) -> bool:
  """Whether EXIF says the image is stored a quarter turn from how it is shown."""
  if img.format == "PNG" and "exif" not in img.info:
    return False
  try:
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
  except Exception:  # noqa: BLE001 (a broken EXIF block: decoding the image names the file, or ignores it)
    return False
  return orientation in (5, 6, 7, 8)


def check_rgb_array(image: np.ndarray) -> np.ndarray:
  """Validates an in-memory image given to the Python API."""
  if isinstance(image, (str, bytes, os.PathLike)):
    raise ImageReadError(f"expected an RGB uint8 array, got a {type(image).__name__}: read a file with "
                         "evf_jax.load_image(path), encoded bytes with evf_jax.images.decode_image(data)")
  a = np.asarray(image)
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ImageReadError(f"expected an RGB image of shape (H, W, 3), got {a.shape}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageReadError(f"image has zero size: {a.shape}")
  if a.dtype != np.uint8:
    raise ImageReadError(f"expected a uint8 image, got {a.dtype}")
  return a


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The reference's visualisation: masked pixels become 0.5 * pixel + 0.5 * (50, 120, 220). `mask`: (H, W),
  bool or numbers (nonzero is masked: 0/1, or 0/255 as the mask PNGs hold)."""
  image = check_rgb_array(image)
  mask = np.asarray(mask)
  if mask.shape != image.shape[:2]:
    raise ValueError(f"the mask is {mask.shape}, the image {image.shape}: expected a mask of the image's (H, W)")
  mask = mask != 0  # an integer mask would index rows
  out = image.copy()
  out[mask] = (image[mask].astype(np.float64) * 0.5 + np.array([50, 120, 220]) * 0.5).astype(np.uint8)  # masked only
  return out


def _write_whole(path: str, write: Callable[[BinaryIO], None]) -> None:
  """`write` into a hidden file beside `path`, then renamed to it: a killed run leaves whole files only, so a
  file that exists is finished (what `predict --skip-existing` relies on)."""
  partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
  with open(partial, "wb") as f:
    write(f)
  os.replace(partial, path)


# What `save_prediction` may write for a base name; the logits only when given.
PREDICTION_SUFFIXES = ("_mask.png", "_vis.png", "_logits.npy")


def save_prediction(base: str, image: np.ndarray, mask: np.ndarray, logits=None) -> None:
  """Writes `<base>_mask.png` (0/255), `<base>_vis.png` (overlay) and, given logits, `<base>_logits.npy`, each
  whole or not at all."""
  _write_whole(base + "_mask.png", lambda f: Image.fromarray(mask.astype(np.uint8) * 255).save(f, format="PNG"))
  _write_whole(base + "_vis.png", lambda f: Image.fromarray(overlay(image, mask)).save(f, format="PNG"))
  if logits is not None:
    _write_whole(base + "_logits.npy", lambda f: np.save(f, np.asarray(logits, np.float32)))
