"""EVF-SAM2's image-path preprocessing (host side, numpy): the whole image squashed to a square with torch's
*uint8* bilinear resize, then normalised.

The original (`sam_preprocess(model_type="sam2")` in EVF-SAM's inference) calls
`F.interpolate(uint8 (1, 3, H, W), (1024, 1024), mode="bilinear", align_corners=False)` on the CPU. For uint8
input torch does not interpolate in float: it runs a separable fixed-point kernel (Pillow-SIMD's resampler)
with int16 weights, a horizontal pass rounded to uint8, then a vertical pass rounded to uint8. Float bilinear
plus rounding differs from it in about a fifth of the output values by one level, which moves mask logits
visibly; `resize_uint8_bilinear` reproduces the kernel exactly (tests/test_sam2_transforms.py).
(Training and evaluation in EVF-SAM2 resize with PIL instead: `evf_jax.sam.transforms.to_frame(mode="square")`.)
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from evf_jax.sam2.config import Sam2Config


@functools.lru_cache(maxsize=64)
def _fixed_point_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Per output pixel: the first input index and int16 weights over a fixed number of taps (zero-padded),
  and the weights' precision in bits, as torch's antialias-free uint8 bilinear computes them."""
  scale = in_size / out_size
  support = 1.0  # the triangle filter's half-width (no antialias: not widened on downscale)
  centers = scale * (np.arange(out_size) + 0.5)
  starts = np.maximum((centers - support + 0.5).astype(np.int64), 0)
  stops = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
  taps = int((stops - starts).max())
  j = np.arange(taps)
  x = (starts[:, None] + j[None, :] - centers[:, None] + 0.5)
  w = np.where(j[None, :] < (stops - starts)[:, None], np.maximum(0.0, 1.0 - np.abs(x)), 0.0)
  w = w / w.sum(axis=1, keepdims=True)
  precision = 0
  while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  scaled = w * (1 << precision)
  fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
  return starts, fixed, precision


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  """One separable pass along `axis` of a uint8 array: int32 accumulation from half an LSB, shift, clip."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  starts, fixed, precision = _fixed_point_weights(in_size, out_size)
  idx = np.minimum(starts[:, None] + np.arange(fixed.shape[1])[None, :], in_size - 1)  # padded taps weigh 0
  src = np.moveaxis(x, axis, 0).astype(np.int64)
  acc = np.einsum("ok,ok...->o...", fixed, src[idx]) + (1 << (precision - 1))
  return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_uint8_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """(H, W, C) uint8 -> (h, w, C) uint8, equal to torch's CPU `F.interpolate(mode="bilinear",
  align_corners=False)` on a uint8 (1, C, H, W) tensor: the horizontal pass first, then the vertical one."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"expected an (H, W, C) uint8 image, got {image.shape} {image.dtype}")
  return _resize_axis(_resize_axis(image, hw[1], axis=1), hw[0], axis=0)


def preprocess(image: np.ndarray, config: Sam2Config) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (S, S, 3) float32 model input: squashed to S x S (aspect ratio not kept, no
  padding), then (x - pixel_mean) / pixel_std in 0..255 units."""
  s = config.image_size
  x = resize_uint8_bilinear(image, (s, s)).astype(np.float32)
  return (x - np.asarray(config.pixel_mean, np.float32)) / np.asarray(config.pixel_std, np.float32)


# ImageNet statistics in 0..1 units, as the video predictor's frame loader normalises.
VIDEO_MEAN = (0.485, 0.456, 0.406)
VIDEO_STD = (0.229, 0.224, 0.225)


def video_frame(image: np.ndarray, size: int) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> (size, size, 3) float32 model input as SAM-2's video frame loader makes it (not the
  image path's): PIL's resize to size x size with its default filter for RGB images (bicubic, antialiased,
  fixed-point, rounded to uint8), divided by 255 in float64, cast to float32, then (x - mean) / std in float32."""
  resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BICUBIC))
  x = (resized / 255.0).astype(np.float32)
  return (x - np.asarray(VIDEO_MEAN, np.float32)) / np.asarray(VIDEO_STD, np.float32)
