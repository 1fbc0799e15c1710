"""SAM-2's memory encoder: a frame's image embedding fused with its predicted mask into a mem_dim-wide memory.
Mirrors `sam2/modeling/memory_encoder.py` (NHWC here). The caller turns the mask logits into the encoder's input
first (sigmoid or binarized, then scaled and shifted; see `Sam2.encode_memory`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam2.position_encoding import sine_position_encoding

Dtype = Any


class MaskDownSampler(nn.Module):
  """(B, S, S, 1) -> (B, S/16, S/16, embed_dim): four 3x3 stride-2 convs (1 -> 4 -> 16 -> 64 -> 256 channels),
  each followed by LayerNorm2d and GELU, then a 1x1 conv. Flax names follow the torch Sequential's indices."""
  embed_dim: int
  num_layers: int = 4
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    ch = 1
    for i in range(self.num_layers):
      ch *= 4
      x = layers.conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), out_axis=None,
                      name=f"encoder_{3 * i}", **kw)(x)
      x = layers.gelu(layers.layer_norm(1e-6, axis_name=None, name=f"encoder_{3 * i + 1}", **kw)(x))
    return layers.conv(self.embed_dim, (1, 1), name=f"encoder_{3 * self.num_layers}", **kw)(x)


class CXBlock(nn.Module):
  """ConvNeXt block: depthwise 7x7 conv, LayerNorm2d, Linear(4x)-GELU-Linear, per-channel scale `gamma`,
  residual."""
  dim: int
  kernel_size: int = 7
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    p = self.kernel_size // 2
    y = nn.Conv(self.dim, (self.kernel_size, self.kernel_size), padding=((p, p), (p, p)),
                feature_group_count=self.dim, name="dwconv",
                kernel_init=layers.logical(nn.initializers.lecun_normal(), ("conv_h", "conv_w", None, "embed")),
                bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)), **kw)(x)
    y = layers.layer_norm(1e-6, name="norm", **kw)(y)
    y = layers.gelu(layers.dense(4 * self.dim, ("embed", "mlp"), name="pwconv1", **kw)(y))
    y = layers.dense(self.dim, ("mlp", "embed"), name="pwconv2", **kw)(y)
    gamma = self.param("gamma", layers.logical(nn.initializers.constant(1e-6), ("embed",)), (self.dim,),
                       self.param_dtype)
    return x + gamma.astype(y.dtype) * y


class Fuser(nn.Module):
  dim: int
  num_layers: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = CXBlock(self.dim, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x


class MemoryEncoder(nn.Module):
  in_dim: int
  out_dim: int
  fuser_layers: int = 2
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pix_feat: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pix_feat (B, h, w, in_dim) (the frame's embedding, without `no_mem_embed`), mask (B, 16h, 16w, 1) already
    scaled -> (memory (B, h, w, out_dim), its sine position encoding (1, h, w, out_dim))."""
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    m = MaskDownSampler(self.in_dim, name="mask_downsampler", **kw)(mask)
    x = layers.conv(self.in_dim, (1, 1), in_axis="embed", out_axis=None, name="pix_feat_proj", **kw)(pix_feat) + m
    x = Fuser(self.in_dim, self.fuser_layers, name="fuser", **kw)(x)
    if self.out_dim != self.in_dim:
      x = layers.conv(self.out_dim, (1, 1), in_axis="embed", out_axis=None, name="out_proj", **kw)(x)
    _, h, w, _ = x.shape
    return x, jnp.asarray(sine_position_encoding(h, w, self.out_dim))[None]
