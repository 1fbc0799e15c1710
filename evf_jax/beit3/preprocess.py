"""Image preprocessing that must match the PyTorch reference bit-for-bit-ish (docs/data.md#32-beit-3-input).

BEiT-3 input: RGB uint8 -> float in [0, 1] -> 224x224 bicubic exactly like
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=False)` -> (x - 0.5) / 0.5.
PyTorch's bicubic is Keys' cubic with A = -0.75, source index (dst + 0.5) * in/out - 0.5 (not clamped),
4 taps with edge clamping and no antialias. `jax.image.resize("cubic")` (A = -0.5, antialiased) and PIL
bicubic are different kernels, hence this module. The resize is separable: on the host, one 4-tap
gather-and-sum per axis with taps precomputed per (in_size, out_size); on device, two small matmuls.

SAM's input normalisation is `evf_jax.sam.transforms.normalize_and_pad` (the host ships uint8 pixels,
4x less bandwidth than float32; the device normalises and re-zeros the padding).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

BEIT_SIZE = 224
BEIT_MEAN = 0.5
BEIT_STD = 0.5
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with A = -0.75 at distances x (>= 0)."""
  a = np.float32(_CUBIC_A)
  x = np.abs(x).astype(np.float32)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, np.float32(0.0)))


@functools.lru_cache(maxsize=64)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch bicubic (align_corners=False) as 4 taps per output: (indices, weights), both (out_size, 4)."""
  # PyTorch computes the source coordinate in float32 for float32 images; doing the same matters (errors of
  # ~1e-4 otherwise for large inputs, where the float32 rounding of the coordinate shifts the weights).
  # Its CPU kernel evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add (a single rounding), which
  # float64 arithmetic rounded once to float32 reproduces.
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  base = np.floor(src)  # not clamped for cubic (unlike bilinear)
  t = (src - base).astype(np.float32)
  base = base.astype(np.int64)
  offsets = np.arange(-1, 3)  # taps base-1 .. base+2; weights depend on the distance to src
  idx = np.clip(base[:, None] + offsets, 0, in_size - 1)  # edge clamp: out-of-range taps reuse the border
  weights = _cubic(t[:, None] - offsets.astype(np.float32)).astype(np.float32)
  idx.setflags(write=False)
  weights.setflags(write=False)
  return idx, weights


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with resized = M @ signal (the dense form of `bicubic_taps`)."""
  idx, weights = bicubic_taps(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size)[:, None].repeat(4, 1), idx), weights)
  m.setflags(write=False)
  return m


def resize_bicubic(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """(H, W, C) float -> (h, w, C) float32 with PyTorch's bicubic (A=-0.75, no antialias, edge clamp)."""
  h_in, w_in = image.shape[:2]
  x = np.asarray(image, np.float32)
  # Separable, rows then columns, 4 gathered taps each: ~50x fewer flops than dense matmuls at 224.
  idx, wt = bicubic_taps(h_in, out_hw[0])
  x = sum(wt[:, k, None, None] * x[idx[:, k]] for k in range(4))
  idx, wt = bicubic_taps(w_in, out_hw[1])
  return sum(wt[None, :, k, None] * x[:, idx[:, k]] for k in range(4))


def beit_image(image_u8: np.ndarray, size: int = BEIT_SIZE) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> (size, size, 3) float32 BEiT-3 input, normalised with mean = std = 0.5.

  Aspect ratio is not kept (squashed), and bicubic overshoot is not clamped, exactly like the reference.
  """
  x = resize_bicubic(np.asarray(image_u8, np.float32) / 255.0, (size, size))
  return (x - BEIT_MEAN) / BEIT_STD


def beit_image_jnp(image_u8, size: int = BEIT_SIZE):
  """The same as `beit_image` on device, for one (H, W, 3) image with a static shape."""
  h_in, w_in = image_u8.shape[:2]
  mh = jnp.asarray(bicubic_matrix(h_in, size))
  mw = jnp.asarray(bicubic_matrix(w_in, size))
  x = image_u8.astype(jnp.float32) / 255.0
  x = jnp.einsum("oh,hwc->owc", mh, x, precision="highest")
  x = jnp.einsum("pw,owc->opc", mw, x, precision="highest")
  return (x - BEIT_MEAN) / BEIT_STD
