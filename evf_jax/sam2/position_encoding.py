"""SAM-2's position encodings. Mirrors `sam2/modeling/position_encoding.py`.

- `sine_position_encoding`: the parameter-free DETR-style sine encoding the FPN neck attaches to every level
  (used by the video memory attention), computed with numpy once per grid size.
- `PositionEmbeddingRandom`: the prompt encoder's random-Fourier encoding, the same as SAM-1's
  (`evf_jax.sam.prompt_encoder`), re-exported here.
- RoPE (`compute_axial_cis`, `apply_rotary_enc`) belongs to the video memory attention:
  `evf_jax.sam2.memory_attention.axial_rope` / `rotate`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from evf_jax.sam.prompt_encoder import PositionEmbeddingRandom

__all__ = ["PositionEmbeddingRandom", "sine_position_encoding"]


@functools.cache
def sine_position_encoding(h: int, w: int, num_pos_feats: int = 256, temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> np.ndarray:
  """(h, w, num_pos_feats) float32 encoding of an h x w grid (`PositionEmbeddingSine`, normalize=True).

  Positions 1..n are normalised by n (+1e-6) and scaled to (0, 2pi]; each axis gets num_pos_feats / 2
  channels alternating sin and cos over the frequencies temperature^(2 * (i // 2) / (num_pos_feats / 2)),
  y's channels first, then x's. Computed in float32 as the original does.
  """
  if num_pos_feats % 2:
    raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
  half = num_pos_feats // 2
  f32 = np.float32
  y = np.arange(1, h + 1, dtype=f32) / (f32(h) + f32(1e-6)) * f32(scale)
  x = np.arange(1, w + 1, dtype=f32) / (f32(w) + f32(1e-6)) * f32(scale)
  dim_t = (f32(temperature) ** (2 * (np.arange(half, dtype=f32) // 2) / f32(half))).astype(f32)

  def axis(p):  # (n,) -> (n, half), [sin, cos, sin, cos, ...]
    a = p[:, None] / dim_t
    return np.stack([np.sin(a[:, 0::2]), np.cos(a[:, 1::2])], axis=2).reshape(len(p), half)

  pos_y = np.broadcast_to(axis(y)[:, None, :], (h, w, half))
  pos_x = np.broadcast_to(axis(x)[None, :, :], (h, w, half))
  out = np.concatenate([pos_y, pos_x], axis=-1).astype(f32)
  out.setflags(write=False)
  return out
