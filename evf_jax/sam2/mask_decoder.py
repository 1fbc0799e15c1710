"""SAM-2's mask decoder. Mirrors `sam2/modeling/sam/mask_decoder.py`; image tensors are NHWC, masks come out
as (B, M, 4h, 4w) like the reference.

What it adds to SAM-1's decoder (`evf_jax.sam.mask_decoder`, whose MLP and two-way transformer it reuses):
an object-score token in front of the IoU token and its head, skip connections from the trunk's two finer
levels into the upscaling (`conv_s0` / `conv_s1` project them; SAM2Base applies those once per image, see
`project_high_res_features`), a sigmoid on the IoU head, the mask tokens returned for object pointers, and the
"dynamic multimask" fallback for single-mask output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam import mask_decoder as sam1
from evf_jax.sam.transformer import TwoWayTransformer

Dtype = Any


def stability_scores(mask_logits: jax.Array, delta: float) -> jax.Array:
  """(..., H, W) logits -> (...) area(logits > delta) / area(logits > -delta), 1 where the latter is empty."""
  area_i = jnp.sum(mask_logits > delta, axis=(-2, -1)).astype(jnp.float32)
  area_u = jnp.sum(mask_logits > -delta, axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)


class MaskDecoder(sam1.MaskDecoder):
  """SAM-1's decoder fields (and its MLP / transformer parameter names) plus SAM-2's options; `__call__` is
  SAM-2's."""
  use_high_res_features: bool = True
  iou_prediction_use_sigmoid: bool = True
  pred_obj_scores: bool = True
  pred_obj_scores_mlp: bool = True
  use_multimask_token_for_obj_ptr: bool = True
  dynamic_multimask_via_stability: bool = False
  dynamic_multimask_stability_delta: float = 0.05
  dynamic_multimask_stability_thresh: float = 0.98

  def setup(self):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    c = self.transformer_dim
    n = self.num_multimask_outputs + 1
    table = lambda: layers.logical(nn.initializers.normal(1.0), (None, "embed"))
    self.iou_token = self.param("iou_token", table(), (1, c), self.param_dtype)
    self.mask_tokens = self.param("mask_tokens", table(), (n, c), self.param_dtype)
    # The IoU and object-score heads decide (the best mask, "no object") on scores a few 1e-3 apart: they run in
    # float32 whatever the compute dtype, so bfloat16's 2^-8 steps do not turn close scores into ties.
    kw32 = {"dtype": jnp.float32, "param_dtype": self.param_dtype}
    if self.pred_obj_scores:
      self.obj_score_token = self.param("obj_score_token", table(), (1, c), self.param_dtype)
      self.pred_obj_score_head = (sam1.MLP(c, 1, 3, name="pred_obj_score_head", **kw32) if self.pred_obj_scores_mlp
                                  else layers.dense(1, ("embed", None), name="pred_obj_score_head", **kw32))
    self.transformer = TwoWayTransformer(self.transformer_depth, c, self.transformer_num_heads,
                                         self.transformer_mlp_dim, self.attention_downsample_rate,
                                         attention=self.attention, name="transformer", **kw)
    self.output_upscaling_0 = layers.conv_transpose(c // 4, (2, 2), strides=(2, 2), in_axis="embed",
                                                    name="output_upscaling_0", **kw)
    self.output_upscaling_1 = layers.layer_norm(1e-6, axis_name=None, name="output_upscaling_1", **kw)
    self.output_upscaling_3 = layers.conv_transpose(c // 8, (2, 2), strides=(2, 2), name="output_upscaling_3", **kw)
    if self.use_high_res_features:
      self.conv_s0 = layers.conv(c // 8, (1, 1), in_axis="embed", out_axis=None, name="conv_s0", **kw)
      self.conv_s1 = layers.conv(c // 4, (1, 1), in_axis="embed", out_axis=None, name="conv_s1", **kw)
    self.output_hypernetworks_mlps = [sam1.MLP(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)
                                      for i in range(n)]
    self.iou_prediction_head = sam1.MLP(self.iou_head_hidden_dim, n, self.iou_head_depth, name="iou_prediction_head",
                                        **kw32)

  def project_high_res_features(self, feat_s0: jax.Array, feat_s1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The neck's two finest levels (d_model wide) -> the decoder's skip inputs (d/8 and d/4 wide)."""
    return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

  def predict_masks(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array,
                    high_res_features: Sequence[jax.Array] | None = None):
    """All mask outputs: masks (B, n, 4h, 4w), iou (B, n), mask tokens (B, n, C), object-score logits (B, 1)."""
    c = self.transformer_dim
    n = self.num_multimask_outputs + 1
    b = sparse.shape[0]
    if image_embeddings.shape[0] not in (1, b):
      raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompts: "
                       "give 1 (shared) or one per prompt")
    dt = self.dtype or jnp.float32
    front = [self.obj_score_token, self.iou_token] if self.pred_obj_scores else [self.iou_token]
    out_tokens = jnp.concatenate(front + [self.mask_tokens], axis=0).astype(dt)
    s = len(front) - 1  # index of the IoU token
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens[None], (b, *out_tokens.shape)), sparse.astype(dt)], 1)
    src = image_embeddings.astype(dt) + dense.astype(dt)
    src = jnp.broadcast_to(src, (b, *src.shape[1:]))
    _, h, w, _ = src.shape
    hs, src = self.transformer(src, image_pe.astype(dt), tokens)
    mask_out = hs[:, s + 1:s + 1 + n]

    x = self.output_upscaling_0(src.reshape(b, h, w, c))
    if self.use_high_res_features:
      if high_res_features is None:
        raise ValueError("this decoder uses high-resolution features: pass (feat_s0, feat_s1)")
      feat_s0, feat_s1 = high_res_features
      x = layers.gelu(self.output_upscaling_1(x + feat_s1.astype(dt)))
      x = layers.gelu(self.output_upscaling_3(x) + feat_s0.astype(dt))
    else:
      x = layers.gelu(self.output_upscaling_3(layers.gelu(self.output_upscaling_1(x))))
    hyper = jnp.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
    masks = jnp.einsum("bmc,byxc->bmyx", hyper, x)

    iou = self.iou_prediction_head(hs[:, s].astype(jnp.float32))
    if self.iou_prediction_use_sigmoid:
      iou = jax.nn.sigmoid(iou)
    if self.pred_obj_scores:
      obj = self.pred_obj_score_head(hs[:, 0].astype(jnp.float32))
    else:  # "object present" with sigmoid ~1
      obj = jnp.full((b, 1), 10.0, iou.dtype)
    return masks, iou, mask_out, obj

  def _dynamic_multimask(self, masks: jax.Array, iou: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Single-mask output, replaced by the best (by IoU) of masks 1..n-1 where mask 0 is unstable."""
    best = jnp.argmax(iou[:, 1:], axis=-1)[:, None]
    best_masks = jnp.take_along_axis(masks[:, 1:], best[:, :, None, None], axis=1)
    best_iou = jnp.take_along_axis(iou[:, 1:], best, axis=1)
    stable = stability_scores(masks[:, 0:1], self.dynamic_multimask_stability_delta) \
        >= self.dynamic_multimask_stability_thresh
    return (jnp.where(stable[:, :, None, None], masks[:, 0:1], best_masks),
            jnp.where(stable, iou[:, 0:1], best_iou))

  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array,
               multimask_output: bool, high_res_features: Sequence[jax.Array] | None = None,
               training: bool = False):
    """Predicts masks.

    Args:
      image_embeddings: (1 or B, h, w, C); a single image is shared by all B prompts.
      image_pe: (1, h, w, C) dense positional encoding (the prompt encoder's `get_dense_pe`).
      sparse: (B, N, C) and dense: (B, h, w, C) prompt embeddings.
      multimask_output: static; masks 1..3, else mask 0 (or the dynamic fallback when enabled).
      high_res_features: (feat_s0 (1 or B, 4h, 4w, C/8), feat_s1 (1 or B, 2h, 2w, C/4)), already projected by
        `project_high_res_features`; required when `use_high_res_features`.
      training: static; the original's train mode, where single-mask output is always mask 0 (the dynamic
        fallback acts in eval mode only).

    Returns:
      mask logits (B, M, 4h, 4w), IoU predictions (B, M), the SAM output tokens for object pointers
      (B, 3 or 1, C) and object-score logits (B, 1).
    """
    masks, iou, mask_out, obj = self.predict_masks(image_embeddings, image_pe, sparse, dense, high_res_features)
    if multimask_output:
      masks, iou = masks[:, 1:], iou[:, 1:]
    elif self.dynamic_multimask_via_stability and not training:
      masks, iou = self._dynamic_multimask(masks, iou)
    else:
      masks, iou = masks[:, 0:1], iou[:, 0:1]
    tokens = mask_out[:, 1:] if multimask_output and self.use_multimask_token_for_obj_ptr else mask_out[:, 0:1]
    return masks, iou, tokens, obj
