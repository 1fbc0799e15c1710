"""Test images."""

from __future__ import annotations

import numpy as np


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """RGB uint8 (h, w, 3): smooth sinusoids plus noise, so resizes are not of pure noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 11.0 - c) for c in range(3)], -1)
  img = (base * 100 + 128 + rng.normal(0, 20, (h, w, 3))).clip(0, 255)
  return img.astype(np.uint8)
