"""SAM's image encoder: a ViTDet-style ViT with windowed and global attention, decomposed relative-position
bias and a convolutional neck. Mirrors `segment_anything/modeling/image_encoder.py`; NHWC throughout.
The attention arithmetic (rel-pos terms, XLA and cuDNN paths) is in `rel_pos_attention.py`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import layers
from evf_jax.sam.common import MLPBlock
from evf_jax.sam.rel_pos_attention import (
  cudnn_rel_pos_attention,
  get_rel_pos,
  rel_pos_attention,
)

__all__ = ["window_partition", "window_unpartition", "get_rel_pos", "block_attention", "Attention", "Block",
           "PatchEmbed", "ImageEncoderViT"]

Dtype = Any


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """(B, H, W, C) -> (B * nh * nw, window, window, C), zero-padding H and W at the bottom/right up to
  multiples of `window`. Returns the padded (Hp, Wp) too."""
  b, h, w, c = x.shape
  pad_h, pad_w = -h % window, -w % window
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # NHWC: H then W
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """The inverse of `window_partition`, dropping the padding."""
  hp, wp = padded_hw
  h, w = hw
  b = x.shape[0] // ((hp // window) * (wp // window))
  x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, hp, wp, -1)
  return x[:, :h, :w, :] if (hp > h or wp > w) else x


def block_attention(qkv: jax.Array, qkv_bias: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, *,
                    num_heads: int, window_size: int, attention: Optional[str]) -> jax.Array:
  """Everything between a block's qkv and proj Linear layers: (B, H, W, 3 * C) -> (B, H, W, C).

  Windowed (window_size > 0): the grid is padded to whole windows, partitioned, attended per window and
  merged back. The reference pads the block's input with zeros and runs qkv on the padding too; here qkv ran
  on the real tokens only (4096 instead of 4900 at 1024 px) and the padding takes qkv(0), i.e. `qkv_bias`;
  proj runs after the merge, on the real tokens only too (the reference drops the padding after it).
  One function, so that `benchmarks/` can swap in kernels that take the whole grid at once.
  """
  _, h, w, c3 = qkv.shape
  dim = c3 // 3
  hd = dim // num_heads
  ws = window_size
  if ws > 0:
    pad_h, pad_w = -h % ws, -w % ws
    if pad_h or pad_w:
      qkv = jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
      real = np.pad(np.ones((h, w, 1), bool), ((0, pad_h), (0, pad_w), (0, 0)))
      qkv = jnp.where(real, qkv, qkv_bias.astype(qkv.dtype))
    qkv, padded = window_partition(qkv, ws)
  grid = (ws, ws) if ws > 0 else (h, w)
  # torch splits the fused output as (3, heads, head_dim).
  qkv = qkv.reshape(qkv.shape[0], grid[0] * grid[1], 3, num_heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if attention == "cudnn":
    out = cudnn_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, grid)
  else:
    out = rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, grid)
  out = out.reshape(-1, *grid, dim)
  return window_unpartition(out, ws, padded, (h, w)) if ws > 0 else out


class Attention(nn.Module):
  """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative-position bias, within
  non-overlapping windows of `window_size` when > 0 (else global). The rel-pos tables are sized for the
  window, or for `input_size` when global."""
  dim: int
  num_heads: int
  input_size: tuple[int, int]  # the grid a global block's rel-pos tables are sized for
  window_size: int = 0
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hd = self.dim // self.num_heads
    qkv_layer = layers.dense(3 * self.dim, ("embed", "heads"), name="qkv", dtype=self.dtype,
                             param_dtype=self.param_dtype)
    qkv = qkv_layer(x)
    table = lambda n, size: self.param(  # noqa: E731
        n, layers.logical(nn.initializers.zeros_init(), (None, None)), (2 * size - 1, hd), self.param_dtype)
    ws = self.window_size
    table_hw = (ws, ws) if ws > 0 else tuple(self.input_size)
    rel_pos_h = table("rel_pos_h", table_hw[0])
    rel_pos_w = table("rel_pos_w", table_hw[1])
    qkv_bias = nn.unbox(qkv_layer.variables["params"]["bias"])  # qkv(0): what the windows' padding holds
    out = block_attention(qkv, qkv_bias, rel_pos_h, rel_pos_w, num_heads=self.num_heads, window_size=ws,
                          attention=self.attention)
    return layers.dense(self.dim, ("heads", "embed"), name="proj", dtype=self.dtype,
                        param_dtype=self.param_dtype)(out)


class Block(nn.Module):
  """Pre-LN transformer block; attention is windowed when `window_size > 0`, else global."""
  dim: int
  num_heads: int
  mlp_ratio: float
  window_size: int
  input_size: tuple[int, int]  # the grid the global block's rel-pos tables are sized for
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shortcut = x
    x = layers.layer_norm(1e-6, name="norm1", **kw)(x)
    x = Attention(self.dim, self.num_heads, self.input_size, window_size=self.window_size,
                  attention=self.attention, name="attn", **kw)(x)
    x = shortcut + x
    y = layers.layer_norm(1e-6, name="norm2", **kw)(x)
    return x + MLPBlock(self.dim, int(self.dim * self.mlp_ratio), name="mlp", **kw)(y)


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.PatchConv(self.embed_dim, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="proj")(x)


class ImageEncoderViT(nn.Module):
  """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, prompt_embed_dim) embeddings."""
  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
  attention: str = "xla"
  remat: bool = False  # recompute block activations in the backward pass (saves memory when fine-tuning)
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    grid = self.img_size // self.patch_size
    x = PatchEmbed(self.embed_dim, self.patch_size, name="patch_embed", **kw)(x)
    # segment-anything starts it at zero because it always loads it; trained from scratch, a random start gives the
    # blocks positions from the first step.
    pos = self.param("pos_embed", layers.logical(nn.initializers.truncated_normal(0.02), (None, None, None, "embed")),
                     (1, grid, grid, self.embed_dim), self.param_dtype)
    if pos.shape[1:3] != x.shape[1:3]:
      raise ValueError(f"image grid {x.shape[1:3]} differs from the pos_embed grid {pos.shape[1:3]}; "
                       f"inputs must be padded to {self.img_size}x{self.img_size}")
    x = x + pos.astype(x.dtype)
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      ws = 0 if i in self.global_attn_indexes else self.window_size
      x = block_cls(self.embed_dim, self.num_heads, self.mlp_ratio, ws, (grid, grid),
                    attention=self.attention, name=f"blocks_{i}", **kw)(layers.batch_constraint(x))
    # Neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (channels last, so plain LayerNorm over C).
    x = layers.conv(self.out_chans, (1, 1), use_bias=False, in_axis="embed", out_axis=None,
                    name="neck_0", **kw)(x)
    x = layers.layer_norm(1e-6, axis_name="norm", name="neck_1", **kw)(x)
    x = layers.conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, in_axis=None,
                    out_axis=None, name="neck_2", **kw)(x)
    return layers.layer_norm(1e-6, axis_name="norm", name="neck_3", **kw)(x)
