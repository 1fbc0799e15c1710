"""SAM's mask postprocess as two small matrix products.

The reference upsamples the 256x256 low-res logits to 1024x1024 (bilinear, align_corners=False, no
antialias), crops the part that covers the resized image (h', w'), and resizes that to the original
(H, W) the same way. Bilinear resizing is linear and separable, so the whole chain is
`A_y @ logits @ A_x^T` with A_y (H, 256) and A_x (W, 256) computed once per image on the host.
On device that is one einsum whose shapes depend only on (H, W) buckets, not on h', w' or the image
content, so a new image of a known bucket does not recompile.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix equal to torch's 1-D bilinear resize, align_corners=False."""
  # Source coordinates in float32 arithmetic, as torch's CPU kernel computes them for float inputs;
  # float64 coordinates differ by up to ~1e-5 px, which shows as ~1e-4 on steep logits.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  # torch's compiled kernel fuses `scale * (dst + 0.5) - 0.5` into one FMA: exact product, one rounding.
  src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))  # torch clamps source coordinates below 0 to 0 (edge replicate)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(f32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m


@functools.lru_cache(maxsize=1024)
def mask_postprocess_matrices(input_hw: tuple[int, int], original_hw: tuple[int, int], *,
                              low_res: int = 256, img_size: int = 1024,
                              pad_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (A_y, A_x) float32 with `A_y @ low_res_logits @ A_x.T` == SAM's postprocess_masks.

  input_hw: the resized (un-padded) image size inside the 1024 frame; original_hw: the user's image size.
  pad_to: optional (H_pad, W_pad) >= original size; extra rows are zero (crop them on the host).
  Cached (datasets have few distinct image sizes; ~5 ms each on 2 CPU cores for 640x480), so the arrays
  are shared and read-only.
  """
  mats = []
  for axis in range(2):
    up = bilinear_matrix(low_res, img_size)[: input_hw[axis]]     # low -> 1024, cropped to h'
    down = bilinear_matrix(input_hw[axis], original_hw[axis])      # h' -> H
    m = down @ up
    if pad_to is not None:
      m = np.pad(m, ((0, pad_to[axis] - m.shape[0]), (0, 0)))
    m = m.astype(np.float32)
    m.flags.writeable = False
    mats.append(m)
  return mats[0], mats[1]


def apply_matrices(low_res_logits, a_y, a_x):
  """(..., low, low) logits -> (..., H, W) with the matrices of `mask_postprocess_matrices`.

  Works on numpy and jax arrays (jnp.einsum under jit).
  """
  return jnp.einsum("hk,...kl,wl->...hw", a_y, low_res_logits, a_x,
                    precision="highest")
