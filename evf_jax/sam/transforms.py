"""SAM's pre- and post-processing.

Host side (numpy/PIL): resize so the longest side is `img_size` (PIL bilinear on uint8, as the reference's
`ResizeLongestSide.apply_image`), normalise with the pixel mean/std, then zero-pad bottom/right (the pad
is 0 in normalised units); point and box coordinates follow the resize.
Device side (JAX): `normalize_and_pad` and `postprocess_masks` (bilinear, half-pixel centres, no
antialias, as torch's `F.interpolate(mode="bilinear", align_corners=False)`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from evf_jax.sam.config import SamConfig

PIXEL_MEAN = SamConfig.pixel_mean
PIXEL_STD = SamConfig.pixel_std


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
  """(new_h, new_w) with the longest side `long_side`, each rounded half up as the reference does."""
  scale = long_side * 1.0 / max(old_h, old_w)
  return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (h, w, 3) uint8, PIL bilinear (PIL's antialiased filter on downscale)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
  return _pil_bilinear(image, get_preprocess_shape(image.shape[0], image.shape[1], long_side))


def _pil_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def frame_hw(h: int, w: int, size: int, mode: str = "longest_side") -> tuple[int, int]:
  """(h', w') of an (h, w) image inside the size x size model frame.

  "longest_side": SAM-1's resize (then bottom/right padding); "square": SAM-2's plain stretch.
  """
  if mode == "square":
    return size, size
  if mode != "longest_side":
    raise ValueError(f"mode must be 'longest_side' or 'square', got {mode!r}")
  return get_preprocess_shape(h, w, size)


def to_frame(image: np.ndarray, size: int = 1024, mode: str = "longest_side") -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 (H, W[, C]) -> ((size, size[, C]) uint8 resized with PIL bilinear and zero-padded, (h', w')).

  The model input before `normalize_and_pad` (which normalises and re-zeros the padding on device);
  single-channel arrays (masks as 0/255) go through the same resampling geometry.
  """
  image = np.asarray(image)
  hw = frame_hw(image.shape[0], image.shape[1], size, mode)
  out = np.zeros((size, size) + image.shape[2:], np.uint8)
  out[:hw[0], :hw[1]] = _pil_bilinear(image, hw)
  return out, hw


def normalize_and_pad_np(image: np.ndarray, img_size: int = 1024, mean: Sequence[float] = PIXEL_MEAN,
                         std: Sequence[float] = PIXEL_STD) -> np.ndarray:
  """(h, w, 3) pixels (0..255) -> (img_size, img_size, 3) float32, normalised then zero-padded."""
  x = (np.asarray(image, np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  h, w = x.shape[:2]
  return np.pad(x, ((0, img_size - h), (0, img_size - w), (0, 0)))


def normalize_and_pad(images: jax.Array, input_hw: jax.Array, img_size: int = 1024,
                      mean: Sequence[float] = PIXEL_MEAN, std: Sequence[float] = PIXEL_STD) -> jax.Array:
  """Jittable variant for batches already placed in fixed (B, img_size, img_size, 3) buffers.

  `input_hw` (B, 2) is the valid (h, w) of each image; everything outside it becomes 0 after
  normalisation (the reference normalises first, then pads with 0).
  """
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  ys = jnp.arange(img_size)[None, :, None]
  xs = jnp.arange(img_size)[None, None, :]
  valid = (ys < input_hw[:, 0, None, None]) & (xs < input_hw[:, 1, None, None])
  return jnp.where(valid[..., None], x, 0.0)


def preprocess(image: np.ndarray, img_size: int = 1024, mean: Sequence[float] = PIXEL_MEAN,
               std: Sequence[float] = PIXEL_STD) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """(H, W, 3) uint8 RGB -> (model input (img_size, img_size, 3) float32, input (h, w), original (H, W))."""
  resized = resize_longest_side(image, img_size)
  return (normalize_and_pad_np(resized, img_size, mean, std), tuple(resized.shape[:2]),
          tuple(np.asarray(image).shape[:2]))


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int = 1024) -> np.ndarray:
  """(..., 2) (x, y) points in original pixels -> the resized-input frame (float64, as the reference)."""
  old_h, old_w = original_size
  new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
  out = np.array(coords, dtype=np.float64)
  out[..., 0] *= new_w / old_w
  out[..., 1] *= new_h / old_h
  return out


def apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int = 1024) -> np.ndarray:
  """(B, 4) (x0, y0, x1, y1) boxes in original pixels -> the resized-input frame."""
  return apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, long_side).reshape(-1, 4)


def _resize_hw(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  # 'linear' without antialias = torch bilinear, align_corners=False, both up and down.
  return jax.image.resize(x, (*x.shape[:-2], *hw), method="linear", antialias=False)


@functools.partial(jax.jit, static_argnames=("input_size", "original_size", "img_size"))
def _postprocess(masks, input_size, original_size, img_size):
  x = _resize_hw(masks.astype(jnp.float32), (img_size, img_size))
  x = x[..., :input_size[0], :input_size[1]]
  return _resize_hw(x, original_size)


def postprocess_masks(masks: jax.Array, input_size: Sequence[int], original_size: Sequence[int],
                      img_size: int = 1024) -> jax.Array:
  """Low-res logits (..., h, w) -> logits at the original image size (..., H, W), float32.

  Upsample to the padded model input (img_size), crop the valid `input_size` region, resize to
  `original_size`. Sizes are static Python ints: one compilation per (input, original) size.
  """
  return _postprocess(masks, tuple(int(v) for v in input_size), tuple(int(v) for v in original_size),
                      int(img_size))
