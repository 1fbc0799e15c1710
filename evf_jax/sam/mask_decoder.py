"""SAM's mask decoder: the two-way transformer, transposed-conv upscaling and hypernetwork mask heads.

Mirrors `segment_anything/modeling/mask_decoder.py`; image tensors are NHWC, masks come out as
(B, M, 4h, 4w) like the reference.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam.transformer import TwoWayTransformer

Dtype = Any


class MLP(nn.Module):
  """`num_layers` Linear layers with ReLU between them."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.num_layers
    for i in range(n):
      last = i == n - 1
      # Logical names: the input is the decoder width, hidden widths are "mlp"; never one name twice.
      axes = ("embed" if i == 0 else ("mlp" if last else None), None if last else "mlp")
      x = layers.dense(self.output_dim if last else self.hidden_dim, axes, name=f"layers_{i}",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)
      if not last:
        x = nn.relu(x)
    return x


class MaskDecoder(nn.Module):
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array,
               dense: jax.Array, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
    """Predicts masks.

    Args:
      image_embeddings: (1 or B, h, w, C); a single image is shared by all B prompts (as the reference's
        repeat_interleave of one image), otherwise image i goes with prompt i.
      image_pe: (1, h, w, C) dense positional encoding.
      sparse: (B, N, C) and dense: (B, h, w, C) prompt embeddings.
      multimask_output: static; the 3 multimask outputs, else the single-mask output.

    Returns:
      mask logits (B, M, 4h, 4w) and IoU predictions (B, M), M = 3 or 1.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.transformer_dim
    n_masks = self.num_multimask_outputs + 1
    table = lambda: layers.logical(nn.initializers.normal(1.0), (None, "embed"))  # noqa: E731
    iou_token = self.param("iou_token", table(), (1, c), self.param_dtype)
    mask_tokens = self.param("mask_tokens", table(), (n_masks, c), self.param_dtype)

    b = sparse.shape[0]
    if image_embeddings.shape[0] not in (1, b):
      raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompts: "
                       "give 1 (shared) or one per prompt")
    dt = self.dtype or jnp.float32
    out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(dt)
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens[None], (b, *out_tokens.shape)),
                              sparse.astype(dt)], axis=1)
    src = image_embeddings.astype(dt) + dense.astype(dt)  # broadcasts a shared image over prompts
    src = jnp.broadcast_to(src, (b, *src.shape[1:]))
    _, h, w, _ = src.shape

    hs, src = TwoWayTransformer(self.transformer_depth, c, self.transformer_num_heads,
                                self.transformer_mlp_dim, self.attention_downsample_rate,
                                attention=self.attention, name="transformer", **kw)(
                                    src, image_pe.astype(dt), tokens)
    iou_out = hs[:, 0]
    mask_out = hs[:, 1:1 + n_masks]

    # Upscale x4: ConvT(k2, s2) -> LayerNorm2d -> GELU -> ConvT(k2, s2) -> GELU.
    x = src.reshape(b, h, w, c)
    x = layers.conv_transpose(c // 4, (2, 2), strides=(2, 2), in_axis="embed", name="output_upscaling_0",
                              **kw)(x)
    x = layers.gelu(layers.layer_norm(1e-6, axis_name=None, name="output_upscaling_1", **kw)(x))
    x = layers.gelu(layers.conv_transpose(c // 8, (2, 2), strides=(2, 2), name="output_upscaling_3",
                                          **kw)(x))

    hyper = jnp.stack([MLP(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(mask_out[:, i])
                       for i in range(n_masks)], axis=1)  # (B, n_masks, C/8)
    masks = jnp.einsum("bmc,byxc->bmyx", hyper, x)
    iou = MLP(self.iou_head_hidden_dim, n_masks, self.iou_head_depth, name="iou_prediction_head", **kw)(iou_out)

    sel = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sel], iou[:, sel]
