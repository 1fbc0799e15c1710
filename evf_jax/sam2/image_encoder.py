"""SAM-2's image encoder: the Hiera trunk and the FPN neck. Mirrors `sam2/modeling/backbones/image_encoder.py`;
NHWC throughout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam2.config import Sam2Config
from evf_jax.sam2.hieradet import Hiera
from evf_jax.sam2.position_encoding import sine_position_encoding

Dtype = Any


def upsample2x(x: jax.Array, mode: str) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C) as torch `F.interpolate(scale_factor=2, mode, align_corners=False)`."""
  if mode == "nearest":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  b, h, w, c = x.shape  # "bilinear": half-pixel centres; an upsample has nothing to antialias
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="linear", antialias=False)


class FpnNeck(nn.Module):
  """1x1 lateral convs to d_model on every trunk level; levels in `fpn_top_down_levels` also add the upsampled
  coarser level (in float32). `convs_0` takes the *coarsest* level, as the original numbers them.

  Returns the features and their sine position encodings, highest resolution first.
  """
  d_model: int
  backbone_channel_list: Sequence[int]  # coarsest first
  fpn_top_down_levels: Sequence[int] = (2, 3)
  fpn_interp_model: str = "nearest"
  fuse_type: str = "sum"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    n = len(self.backbone_channel_list) - 1
    if len(xs) != n + 1:
      raise ValueError(f"{len(xs)} trunk levels for a neck of {n + 1}")
    out: list[Any] = [None] * (n + 1)
    prev = None
    for i in range(n, -1, -1):  # coarse to fine
      lateral = layers.conv(self.d_model, (1, 1), in_axis=None, out_axis=None, name=f"convs_{n - i}",
                            dtype=self.dtype, param_dtype=self.param_dtype)(xs[i])
      if i in self.fpn_top_down_levels and prev is not None:
        prev = lateral + upsample2x(prev.astype(jnp.float32), self.fpn_interp_model)
        if self.fuse_type == "avg":
          prev = prev / 2
      else:
        prev = lateral
      out[i] = prev
    pos = [jnp.asarray(sine_position_encoding(x.shape[1], x.shape[2], self.d_model), x.dtype)[None] for x in out]
    return out, pos


class ImageEncoder(nn.Module):
  """(B, S, S, 3) normalised images -> dict(vision_features, vision_pos_enc, backbone_fpn), as the original:
  `backbone_fpn` lists the neck levels highest resolution first, without the `scalp` coarsest ones, and
  `vision_features` is its last (coarsest kept) level. Position encodings are (1, h, w, d_model)."""
  config: Sam2Config
  attention: str | None = "xla"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, Any]:
    cfg = self.config
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    feats = Hiera(cfg.embed_dim, cfg.block_specs(), cfg.stage_ends, cfg.window_pos_embed_bkg_spatial_size,
                  cfg.window_spec[0], cfg.q_stride, cfg.mlp_ratio, attention=self.attention, name="trunk", **kw)(x)
    features, pos = FpnNeck(cfg.d_model, cfg.channel_list, cfg.fpn_top_down_levels, cfg.fpn_interp_model,
                            cfg.fuse_type, name="neck", **kw)(feats)
    if cfg.scalp > 0:
      features, pos = features[:-cfg.scalp], pos[:-cfg.scalp]
    return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
