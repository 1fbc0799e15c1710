"""The SAM-2 image model: Hiera image encoder + SAM prompt encoder + SAM-2 mask decoder, with the image features
reusable across prompts (`embed_image` once, `decode` many times). Mirrors the image path of
`sam2/modeling/sam2_base.py` (`forward_image`, `_prepare_backbone_features`) and of `SAM2ImagePredictor`
(`no_mem_embed` added to the image embedding). The video memory modules are not ported yet; their checkpoint
tensors are skipped by the converter (`convert.sam2.VIDEO_ONLY`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam2.config import Sam2Config
from evf_jax.sam2.image_encoder import ImageEncoder
from evf_jax.sam2.mask_decoder import MaskDecoder
from evf_jax.sam2.prompt_encoder import PromptEncoder

Dtype = Any


class Sam2(nn.Module):
  config: Sam2Config
  attention: str | None = "xla"  # None (best available) | "xla" | "cudnn"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.image_encoder = ImageEncoder(cfg, attention=self.attention, **kw)
    e = cfg.embedding_size
    self.sam_prompt_encoder = PromptEncoder(
        embed_dim=cfg.d_model, image_embedding_size=(e, e), input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans, **kw)
    self.sam_mask_decoder = MaskDecoder(
        transformer_dim=cfg.d_model, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        transformer_depth=cfg.decoder_depth, transformer_num_heads=cfg.decoder_num_heads,
        transformer_mlp_dim=cfg.decoder_mlp_dim, attention_downsample_rate=cfg.attention_downsample_rate,
        use_high_res_features=cfg.use_high_res_features_in_sam,
        iou_prediction_use_sigmoid=cfg.iou_prediction_use_sigmoid, pred_obj_scores=cfg.pred_obj_scores,
        pred_obj_scores_mlp=cfg.pred_obj_scores_mlp,
        use_multimask_token_for_obj_ptr=cfg.use_multimask_token_for_obj_ptr,
        dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability,
        dynamic_multimask_stability_delta=cfg.dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh=cfg.dynamic_multimask_stability_thresh,
        # The decoder's attentions are tiny (a few tokens against h*w): XLA's, also when the encoder uses cuDNN.
        attention="xla" if self.attention == "cudnn" else self.attention, **kw)
    self.no_mem_embed = self.param("no_mem_embed", layers.logical(nn.initializers.truncated_normal(0.02),
                                                                  (None, None, "embed")),
                                   (1, 1, cfg.d_model), self.param_dtype)

  def forward_image(self, images: jax.Array) -> dict[str, Any]:
    """`SAM2Base.forward_image`: the image encoder's outputs (see `ImageEncoder`), with the two finest levels of
    `backbone_fpn` already projected by the decoder's `conv_s0` / `conv_s1` when high-res features are used."""
    out = self.image_encoder(images)
    if self.config.use_high_res_features_in_sam:
      fpn = list(out["backbone_fpn"])
      fpn[0], fpn[1] = self.sam_mask_decoder.project_high_res_features(fpn[0], fpn[1])
      out = {**out, "backbone_fpn": fpn}
    return out

  def embed_image(self, images: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(B, S, S, 3) normalised images -> the image embedding (B, h, w, C) (with `no_mem_embed` added, as for a
    frame without memory) and the high-res features ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)), or () without them."""
    fpn = self.forward_image(images)["backbone_fpn"]
    levels = 3 if self.config.use_high_res_features_in_sam else 1
    fpn = fpn[-levels:]
    embed = fpn[-1]
    if self.config.directly_add_no_mem_embed:
      embed = embed + self.no_mem_embed.astype(embed.dtype)[None]
    return embed, tuple(fpn[:-1])

  def encode_prompts(self, points=None, boxes=None, masks=None, extra_sparse=None):
    """-> sparse (B, N, C), dense (B, h, w, C); see `evf_jax.sam.prompt_encoder.PromptEncoder.__call__` (point
    labels 2 and 3 are box corners here)."""
    return self.sam_prompt_encoder(points, boxes, masks, extra_sparse)

  def get_dense_pe(self) -> jax.Array:
    return self.sam_prompt_encoder.get_dense_pe()

  def decode(self, image_embed: jax.Array, high_res_feats: tuple[jax.Array, ...] = (),
             points: tuple[jax.Array, jax.Array] | None = None, boxes: jax.Array | None = None,
             masks: jax.Array | None = None, extra_sparse: jax.Array | None = None,
             multimask_output: bool = False):
    """Masks for prompts on (cached) image features from `embed_image` (one image shared by all B prompts, or one
    per prompt). Returns low-res mask logits (B, M, 4h, 4w), IoU predictions (B, M), the SAM output tokens
    (B, 3 or 1, C) and object-score logits (B, 1); see `MaskDecoder.__call__`."""
    sparse, dense = self.sam_prompt_encoder(points, boxes, masks, extra_sparse)
    return self.sam_mask_decoder(image_embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output, high_res_feats or None)

  def __call__(self, images: jax.Array, points=None, boxes=None, masks=None, extra_sparse=None,
               multimask_output: bool = False):
    """Image encoder then decoder (also what `init` traces, so every parameter is created)."""
    embed, high_res = self.embed_image(images)
    return self.decode(embed, high_res, points, boxes, masks, extra_sparse, multimask_output)


def dummy_inputs(config: Sam2Config, batch: int = 1) -> dict[str, Any]:
  """Inputs that reach every parameter (a mask prompt is needed for `mask_downscaling`)."""
  s, lr = config.image_size, config.low_res_size
  return {"images": jnp.zeros((batch, s, s, 3), jnp.float32),
              "points": (jnp.zeros((batch, 1, 2), jnp.float32), jnp.ones((batch, 1), jnp.int32)),
              "masks": jnp.zeros((batch, 1, lr, lr), jnp.float32)}


def abstract_params(config: Sam2Config, *, param_dtype: Dtype = jnp.float32, boxed: bool = False) -> dict[str, Any]:
  """The parameter tree as ShapeDtypeStructs (no memory; what the converter fills). `boxed` keeps the logical-axis
  metadata."""
  model, inputs = Sam2(config, param_dtype=param_dtype), dummy_inputs(config)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs)["params"])
  return tree if boxed else nn.unbox(tree)


def init_params(config: Sam2Config, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> dict[str, Any]:
  """Randomly initialised (unboxed) params, e.g. for tests."""
  model, inputs = Sam2(config, param_dtype=param_dtype), dummy_inputs(config)
  return nn.unbox(jax.jit(lambda r: model.init(r, **inputs)["params"])(rng))
