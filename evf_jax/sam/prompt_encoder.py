"""SAM's prompt encoder: points, boxes and mask prompts -> sparse and dense embeddings.

Mirrors `segment_anything/modeling/prompt_encoder.py`, plus EVF-SAM's change: an `extra_sparse` input
(its projected text embedding) appended after the point/box embeddings, which also sets the batch size
when no other prompt is given.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import layers

Dtype = Any


class PositionEmbeddingRandom(nn.Module):
  """Positional encoding with random spatial frequencies (a fixed (2, C/2) Gaussian matrix)."""
  num_pos_feats: int = 64

  def setup(self):
    # A fixed buffer in torch, but stored in the checkpoint; a param here (frozen when fine-tuning).
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix", layers.logical(nn.initializers.normal(1.0), (None, None)),
        (2, self.num_pos_feats), jnp.float32)

  def encode(self, coords: jax.Array) -> jax.Array:
    """coords (..., 2) as (x, y) in [0, 1] -> (..., 2 * num_pos_feats), always in float32."""
    g = self.positional_encoding_gaussian_matrix.astype(jnp.float32)
    c = 2.0 * coords.astype(jnp.float32) - 1.0
    # A K=2 contraction written out: exact whatever the default matmul precision (TF32 on GPUs would
    # visibly perturb sin/cos of these arguments).
    proj = 2.0 * np.pi * (c[..., 0:1] * g[0] + c[..., 1:2] * g[1])
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

  def grid(self, h: int, w: int) -> jax.Array:
    """(h, w, C) encoding of the pixel centres of an h x w grid."""
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self.encode(xy)

  def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """coords (B, N, 2) in input-image pixels (x, y) -> (B, N, C)."""
    scale = jnp.array([1.0 / image_size[1], 1.0 / image_size[0]], jnp.float32)
    return self.encode(coords.astype(jnp.float32) * scale)

  def __call__(self, coords: jax.Array) -> jax.Array:
    return self.encode(coords)


class PromptEncoder(nn.Module):
  embed_dim: int = 256
  image_embedding_size: tuple[int, int] = (64, 64)
  input_image_size: tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  num_point_embeddings = 4  # negative/positive point, box top-left/bottom-right corners

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
    table = lambda: layers.logical(nn.initializers.normal(1.0), (None, "embed"))  # noqa: E731
    for i in range(self.num_point_embeddings):
      setattr(self, f"point_embeddings_{i}",
              self.param(f"point_embeddings_{i}", table(), (1, self.embed_dim), self.param_dtype))
    self.not_a_point_embed = self.param("not_a_point_embed", table(), (1, self.embed_dim), self.param_dtype)
    self.no_mask_embed = self.param("no_mask_embed", table(), (1, self.embed_dim), self.param_dtype)
    c = self.mask_in_chans
    self.mask_downscaling_0 = layers.conv(c // 4, (2, 2), strides=(2, 2), out_axis=None, **kw,
                                          name="mask_downscaling_0")
    self.mask_downscaling_1 = layers.layer_norm(1e-6, axis_name=None, **kw, name="mask_downscaling_1")
    self.mask_downscaling_3 = layers.conv(c, (2, 2), strides=(2, 2), out_axis=None, **kw,
                                          name="mask_downscaling_3")
    self.mask_downscaling_4 = layers.layer_norm(1e-6, axis_name=None, **kw, name="mask_downscaling_4")
    self.mask_downscaling_6 = layers.conv(self.embed_dim, (1, 1), out_axis="embed", **kw,
                                          name="mask_downscaling_6")

  @property
  def mask_input_size(self) -> tuple[int, int]:
    return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

  def get_dense_pe(self) -> jax.Array:
    """(1, h, w, C) positional encoding of the image-embedding grid (NHWC; torch's is NCHW)."""
    return self.pe_layer.grid(*self.image_embedding_size)[None].astype(self._out_dtype)

  @property
  def _out_dtype(self):
    return self.dtype or jnp.float32

  def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    coords = coords.astype(jnp.float32) + 0.5  # to pixel centres
    labels = labels.astype(jnp.int32)
    if pad:  # a "not a point" entry when there is no box, as the reference does
      b = coords.shape[0]
      coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), coords.dtype)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
    emb = self.pe_layer.with_coords(coords, self.input_image_size)
    lab = labels[..., None]
    emb = jnp.where(lab == -1, self.not_a_point_embed.astype(jnp.float32), emb)
    emb = emb + jnp.where(lab == 0, self.point_embeddings_0.astype(jnp.float32), 0.0)
    emb = emb + jnp.where(lab == 1, self.point_embeddings_1.astype(jnp.float32), 0.0)
    return emb

  def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
    corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
    emb = self.pe_layer.with_coords(corners, self.input_image_size)
    corner_embed = jnp.concatenate([self.point_embeddings_2, self.point_embeddings_3], axis=0)
    return emb + corner_embed.astype(jnp.float32)[None]

  def _embed_masks(self, masks: jax.Array) -> jax.Array:
    x = jnp.moveaxis(masks, 1, -1).astype(self._out_dtype)  # (B, 1, H, W) -> NHWC
    x = layers.gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
    x = layers.gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
    return self.mask_downscaling_6(x)

  def __call__(self, points: Optional[tuple[jax.Array, jax.Array]] = None,
               boxes: Optional[jax.Array] = None, masks: Optional[jax.Array] = None,
               extra_sparse: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Embeds prompts.

    Args:
      points: (coords (B, N, 2) as (x, y) in input-frame pixels, labels (B, N): 1 foreground,
        0 background, -1 padding).
      boxes: (B, 4) as (x0, y0, x1, y1) in input-frame pixels.
      masks: (B, 1, 4h, 4w) mask logits (the decoder's low-res output layout).
      extra_sparse: (B, n, C) embeddings appended after the point/box ones (EVF-SAM's text prompt).

    Returns:
      sparse (B, N', C) and dense (B, h, w, C) embeddings.
    """
    for x in (points[0] if points is not None else None, boxes, masks, extra_sparse):
      if x is not None:
        bs = x.shape[0]
        break
    else:
      bs = 1
    parts = []
    if points is not None:
      parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
    if boxes is not None:
      parts.append(self._embed_boxes(boxes))
    if extra_sparse is not None:
      parts.append(extra_sparse)
    dt = self._out_dtype
    parts = [p.astype(dt) for p in parts]
    sparse = jnp.concatenate(parts, axis=1) if parts else jnp.zeros((bs, 0, self.embed_dim), dt)
    if masks is not None:
      dense = self._embed_masks(masks)
    else:
      h, w = self.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed.astype(dt).reshape(1, 1, 1, -1), (bs, h, w, self.embed_dim))
    return sparse, dense
