"""SAM-2's Hiera trunk: a hierarchical ViT with windowed attention, q-pooling at stage changes and a windowed
position embedding. Mirrors `sam2/modeling/backbones/hieradet.py` (and `backbones/utils.py`, whose window
helpers are SAM-1's: `evf_jax.sam.image_encoder`); NHWC throughout.

Unlike SAM-1's ViT there is no relative-position bias, and windows are padded with zeros *before* the qkv
projection (so padded keys carry qkv's bias and are attended to, unmasked, as in the original).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.beit3.preprocess import bicubic_matrix
from evf_jax.sam.common import MLPBlock
from evf_jax.sam.image_encoder import window_partition, window_unpartition
from evf_jax.sam2.config import BlockSpec

Dtype = Any


def max_pool(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """torch `MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)` on (B, H, W, C): a remainder row or
  column is dropped."""
  b, h, w, c = x.shape
  sh, sw = stride
  x = x[:, :h // sh * sh, :w // sw * sw]
  return x.reshape(b, h // sh, sh, w // sw, sw, c).max(axis=(2, 4))


class MultiScaleAttention(nn.Module):
  """Self-attention over a (B, H, W, dim) grid (or its windows) projecting to dim_out; with `q_stride`, the
  queries alone are max-pooled, so the output grid is smaller than the input."""
  dim_out: int
  num_heads: int
  q_stride: tuple[int, int] | None = None
  attention: str | None = "xla"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    b, h, w, _ = x.shape
    n, hd = self.num_heads, self.dim_out // self.num_heads
    # torch splits the fused output as (3, heads, head_dim).
    qkv = layers.dense(3 * self.dim_out, ("embed", "heads"), name="qkv", **kw)(x)
    if self.attention == "cudnn":  # cuDNN takes (B, T, N, D)
      qkv = qkv.reshape(b, h, w, 3, n, hd)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
      if self.q_stride:
        q = max_pool(q.reshape(b, h, w, self.dim_out), self.q_stride)
        q = q.reshape(*q.shape[:3], n, hd)
      out_hw = q.shape[1:3]
      out = layers.attention(q.reshape(b, -1, n, hd), k.reshape(b, h * w, n, hd), v.reshape(b, h * w, n, hd),
                             implementation=self.attention)
      out = out.reshape(b, *out_hw, self.dim_out)
    else:  # heads first: one transpose of qkv, one of the output
      qkv = qkv.reshape(b, h, w, 3, n, hd).transpose(3, 0, 4, 1, 2, 5)  # (3, B, N, H, W, D)
      q, k, v = qkv[0], qkv[1], qkv[2]
      if self.q_stride:  # the same pool with heads folded into the batch
        q = max_pool(q.reshape(b * n, h, w, hd), self.q_stride)
        q = q.reshape(b, n, *q.shape[1:])
      out_hw = q.shape[2:4]
      out = layers.heads_first_attention(q.reshape(b, n, -1, hd), k.reshape(b, n, h * w, hd),
                                         v.reshape(b, n, h * w, hd))
      out = out.reshape(b, n, *out_hw, hd).transpose(0, 2, 3, 1, 4).reshape(b, *out_hw, self.dim_out)
    return layers.dense(self.dim_out, ("heads", "embed"), name="proj", **kw)(out)


class MultiScaleBlock(nn.Module):
  """Pre-LN block; on a stage change (dim != dim_out) the shortcut is `proj` of the *normed* input, pooled."""
  dim: int
  dim_out: int
  num_heads: int
  mlp_ratio: float = 4.0
  q_stride: tuple[int, int] | None = None
  window_size: int = 0
  attention: str | None = "xla"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    shortcut = x
    x = layers.layer_norm(1e-6, name="norm1", **kw)(x)
    if self.dim != self.dim_out:
      shortcut = layers.dense(self.dim_out, ("embed", None), name="proj", **kw)(x)
      if self.q_stride:
        shortcut = max_pool(shortcut, self.q_stride)
    ws = self.window_size
    hw = x.shape[1:3]
    if ws > 0:
      x, _ = window_partition(x, ws)
    x = MultiScaleAttention(self.dim_out, self.num_heads, self.q_stride, attention=self.attention, name="attn",
                            **kw)(x)
    if ws > 0:
      hw = shortcut.shape[1:3]
      if self.q_stride:  # the windows shrank with the queries
        ws //= self.q_stride[0]
      padded = tuple(-(-s // ws) * ws for s in hw)
      n_windows = (padded[0] // ws) * (padded[1] // ws)
      if x.shape[0] != shortcut.shape[0] * n_windows:
        raise ValueError(f"pooled windows of {x.shape[1:3]} do not tile the {hw} grid; q-pooling needs an even "
                         "window that the grid's padding keeps aligned")
      x = window_unpartition(x, ws, padded, hw)
    x = shortcut + x
    y = layers.layer_norm(1e-6, name="norm2", **kw)(x)
    return x + MLPBlock(self.dim_out, int(self.dim_out * self.mlp_ratio), name="mlp", **kw)(y)


class PatchEmbed(nn.Module):
  """Conv2d(3 -> embed_dim, k7, s4, p3), channels last."""
  embed_dim: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.embed_dim, (7, 7), strides=(4, 4), padding=((3, 3), (3, 3)), name="proj",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Hiera(nn.Module):
  """(B, H, W, 3) normalised images -> the outputs of the stage ends, highest resolution first, NHWC.

  `block_specs` is `Sam2Config.block_specs()`.
  """
  embed_dim: int
  block_specs: Sequence[BlockSpec]
  stage_ends: Sequence[int]
  window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
  window_spec0: int = 8
  q_stride: tuple[int, int] = (2, 2)
  mlp_ratio: float = 4.0
  attention: str | None = "xla"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _pos_embed(self, hw: tuple[int, int]) -> jax.Array:
    """(1, h, w, C): the background embedding resized to the grid as torch's `F.interpolate(mode="bicubic")`
    (`jax.image.resize`'s cubic is another kernel), plus the window embedding tiled over it. Both tables keep
    torch's (1, C, h, w) layout."""
    def table(name, shape):
      init = layers.logical(nn.initializers.zeros_init(), (None, "embed", None, None))
      return self.param(name, init, shape, self.param_dtype).astype(jnp.float32)

    (h, w), (bh, bw), ws = hw, self.window_pos_embed_bkg_spatial_size, self.window_spec0
    bkg = table("pos_embed", (1, self.embed_dim, bh, bw))
    win = table("pos_embed_window", (1, self.embed_dim, ws, ws))
    if h % ws or w % ws:
      raise ValueError(f"token grid {hw} is not a multiple of the {ws}-window position embedding")
    ry, rx = jnp.asarray(bicubic_matrix(bh, h)), jnp.asarray(bicubic_matrix(bw, w))
    pos = jnp.einsum("yi,bcij,xj->byxc", ry, bkg, rx, precision=jax.lax.Precision.HIGHEST)
    return pos + jnp.tile(win.transpose(0, 2, 3, 1), (1, h // ws, w // ws, 1))

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    x = PatchEmbed(self.embed_dim, name="patch_embed", **kw)(x)
    x = x + self._pos_embed(x.shape[1:3]).astype(x.dtype)
    outputs = []
    for i, spec in enumerate(self.block_specs):
      x = MultiScaleBlock(spec.dim, spec.dim_out, spec.num_heads, self.mlp_ratio,
                          self.q_stride if spec.q_pool else None, spec.window_size,
                          attention=self.attention, name=f"blocks_{i}", **kw)(layers.batch_constraint(x))
      if i in self.stage_ends:
        outputs.append(x)
    return outputs
