"""SAM-2: Hiera image encoder + SAM prompt encoder + SAM-2 mask decoder, with the image features reusable across
prompts (`embed_image` once, `decode` many times), and the video memory: memory attention, memory encoder,
object pointers and temporal encodings. Mirrors `sam2/modeling/sam2_base.py`: the image path (`forward_image`,
`_prepare_backbone_features`, `no_mem_embed` added to the image embedding as `SAM2ImagePredictor` does) and one
tracking step on a non-conditioning frame (`track_frame`: `_prepare_memory_conditioned_features`,
`_forward_sam_heads`, `_encode_new_memory`) over a fixed-shape memory buffer (see `evf_jax.sam2.tracking`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import layers, postprocess, runtime
from evf_jax.sam import mask_decoder as sam1_decoder
from evf_jax.sam2.config import Sam2Config
from evf_jax.sam2.image_encoder import ImageEncoder
from evf_jax.sam2.mask_decoder import MaskDecoder
from evf_jax.sam2.memory_attention import MemoryAttention
from evf_jax.sam2.memory_encoder import MemoryEncoder
from evf_jax.sam2.position_encoding import sine_position_encoding
from evf_jax.sam2.prompt_encoder import PromptEncoder

Dtype = Any

# The mask logit of "no object" (the original's NO_OBJ_SCORE): where the object-score logit is <= 0, every
# low-res mask logit of the frame becomes this.
NO_OBJ_SCORE = -1024.0


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
    tn = lambda names: layers.logical(nn.initializers.truncated_normal(0.02), names)
    self.no_mem_embed = self.param("no_mem_embed", tn((None, None, "embed")), (1, 1, cfg.d_model), self.param_dtype)
    # Video memory.
    self.memory_attention = MemoryAttention(cfg.d_model, cfg.memory_attention_layers, cfg.memory_attention_mlp_dim,
                                            cfg.memory_attention_heads, cfg.mem_dim, cfg.rope_theta, **kw)
    self.memory_encoder = MemoryEncoder(cfg.d_model, cfg.mem_dim, cfg.fuser_layers, **kw)
    self.maskmem_tpos_enc = self.param("maskmem_tpos_enc", tn((None, None, None, None)),
                                       (cfg.num_maskmem, 1, 1, cfg.mem_dim), self.param_dtype)
    # Unused with `directly_add_no_mem_embed` (the released configs) but part of every checkpoint.
    self.no_mem_pos_enc = self.param("no_mem_pos_enc", tn((None, None, "embed")), (1, 1, cfg.d_model),
                                     self.param_dtype)
    self.no_obj_ptr = self.param("no_obj_ptr", tn((None, "embed")), (1, cfg.d_model), self.param_dtype)
    self.obj_ptr_proj = sam1_decoder.MLP(cfg.d_model, cfg.d_model, 3, name="obj_ptr_proj", **kw)
    # Only for mask prompts on a frame (`_use_mask_as_output`), which EVF-SAM2 never gives.
    self.mask_downsample = layers.conv(1, (4, 4), strides=(4, 4), out_axis=None, name="mask_downsample", **kw)

  def forward_image(self, images: jax.Array, stop_encoder_gradient: bool = False) -> dict[str, Any]:
    """`SAM2Base.forward_image`: the image encoder's outputs (see `ImageEncoder`), with the two finest levels of
    `backbone_fpn` already projected by the decoder's `conv_s0` / `conv_s1` when high-res features are used.
    stop_encoder_gradient: no gradient into the encoder (trunk and neck), while the decoder's projections,
    which run here, still get theirs."""
    out = self.image_encoder(images)
    if stop_encoder_gradient:
      out = jax.lax.stop_gradient(out)
    if self.config.use_high_res_features_in_sam:
      fpn = list(out["backbone_fpn"])
      fpn[0], fpn[1] = self.sam_mask_decoder.project_high_res_features(fpn[0], fpn[1])
      out = {**out, "backbone_fpn": fpn}
    return out

  def image_features(self, images: jax.Array,
                     stop_encoder_gradient: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(B, S, S, 3) normalised images -> the lowest level kept (B, h, w, C), as the memory encoder and the
    memory attention take it, and the high-res features ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)), or () without
    them."""
    fpn = self.forward_image(images, stop_encoder_gradient)["backbone_fpn"]
    levels = 3 if self.config.use_high_res_features_in_sam else 1
    fpn = fpn[-levels:]
    return fpn[-1], tuple(fpn[:-1])

  def add_no_mem_embed(self, embed: jax.Array) -> jax.Array:
    """The embedding of a frame without memory (an image, or a video's conditioning frame)."""
    if self.config.directly_add_no_mem_embed:
      embed = embed + self.no_mem_embed.astype(embed.dtype)[None]
    return embed

  def embed_image(self, images: jax.Array,
                  stop_encoder_gradient: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(B, S, S, 3) normalised images -> the image embedding (B, h, w, C) (with `no_mem_embed` added, as for a
    frame without memory) and the high-res features ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)), or () without them."""
    embed, high_res = self.image_features(images, stop_encoder_gradient)
    return self.add_no_mem_embed(embed), high_res

  def encode_prompts(self, points=None, boxes=None, masks=None, extra_sparse=None):
    """-> sparse (B, N, C), dense (B, h, w, C); see `evf_jax.sam.prompt_encoder.PromptEncoder.__call__` (point
    labels 2 and 3 are box corners here)."""
    return self.sam_prompt_encoder(points, boxes, masks, extra_sparse)

  def get_dense_pe(self) -> jax.Array:
    return self.sam_prompt_encoder.get_dense_pe()

  def decode(self, image_embed: jax.Array, high_res_feats: tuple[jax.Array, ...] = (),
             points: tuple[jax.Array, jax.Array] | None = None, boxes: jax.Array | None = None,
             masks: jax.Array | None = None, extra_sparse: jax.Array | None = None,
             multimask_output: bool = False, training: bool = False):
    """Masks for prompts on (cached) image features from `embed_image` (one image shared by all B prompts, or one
    per prompt). Returns low-res mask logits (B, M, 4h, 4w), IoU predictions (B, M), the SAM output tokens
    (B, 3 or 1, C) and object-score logits (B, 1); see `MaskDecoder.__call__`."""
    sparse, dense = self.sam_prompt_encoder(points, boxes, masks, extra_sparse)
    return self.sam_mask_decoder(image_embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output, high_res_feats or None, training)

  # ------------------------------------------------------------------------------------------- video

  def sam_heads(self, pix_feat: jax.Array, high_res_feats: tuple[jax.Array, ...] = (),
                extra_sparse: jax.Array | None = None) -> dict[str, jax.Array]:
    """`_forward_sam_heads` with multimask output, as the video predictor runs it on every frame of an
    EVF-SAM2 video: the prompt is `extra_sparse` (B, n, C) (EVF's text on the conditioning frame, no point), or,
    without it, SAM-2's "no prompt": one padding point (label -1) plus the pad, i.e. two `not_a_point_embed`
    tokens. Then object-score gating (all logits NO_OBJ_SCORE where the score logit is <= 0), the best of the 3
    masks by predicted IoU, and the object pointer of that mask's token (`no_obj_ptr` where there is no object).

    Returns low_res (B, 1, 4h, 4w) gated best logits, iou (B, 3), obj_ptr (B, C), object_score (B, 1)."""
    b = pix_feat.shape[0]
    points = None
    if extra_sparse is None:
      points = (jnp.zeros((b, 1, 2), jnp.float32), -jnp.ones((b, 1), jnp.int32))
    masks, iou, tokens, obj = self.decode(pix_feat, high_res_feats, points=points, extra_sparse=extra_sparse,
                                          multimask_output=True)
    masks, obj = masks.astype(jnp.float32), obj.astype(jnp.float32)
    if self.config.pred_obj_scores:
      appearing = obj > 0
      masks = jnp.where(appearing[:, :, None, None], masks, NO_OBJ_SCORE)
    best = jnp.argmax(iou, axis=-1)
    low_res = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)
    token = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0] if tokens.shape[1] > 1 else tokens[:, 0]
    ptr = self.obj_ptr_proj(token).astype(jnp.float32)
    if self.config.pred_obj_scores:  # fixed_no_obj_ptr in the released configs
      lam = appearing.astype(jnp.float32)
      ptr = lam * ptr + (1 - lam) * self.no_obj_ptr.astype(jnp.float32)
    return {"low_res": low_res, "iou": iou, "obj_ptr": ptr, "object_score": obj}

  def upsample_to_image(self, low_res: jax.Array) -> jax.Array:
    """(B, 1, 4h, 4w) logits -> (B, 1, S, S), torch's bilinear resize (align_corners=False)."""
    s = self.config.image_size
    a = postprocess.bilinear_matrix(low_res.shape[-1], s).astype(np.float32)
    return postprocess.apply_matrices(low_res.astype(jnp.float32), a, a)

  def encode_memory(self, pix_feat: jax.Array, high_res_logits: jax.Array, binarize: bool) -> jax.Array:
    """`_encode_new_memory`: pix_feat (B, h, w, C) (the frame's embedding without `no_mem_embed`) and mask logits
    at image size (B, 1, S, S) -> the memory (B, h * w, mem_dim), rounded to bfloat16 as the video predictor
    stores it. `binarize`: the mask is (logits > 0) (a prompted frame), else sigmoid(logits); either way then
    scaled and shifted (x 20 - 10)."""
    cfg = self.config
    m = (high_res_logits > 0).astype(jnp.float32) if binarize else jax.nn.sigmoid(high_res_logits)
    m = m * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    mem, _ = self.memory_encoder(pix_feat, jnp.moveaxis(m, 1, -1))
    b, h, w, c = mem.shape
    return mem.reshape(b, h * w, c).astype(jnp.bfloat16).astype(jnp.float32)

  def memory_pos(self) -> jax.Array:
    """(num_maskmem, h * w, mem_dim): the memory encoder's sine encoding plus each temporal encoding. Row
    num_maskmem - 1 is the conditioning frame's, row k the frame k + 1 frames back."""
    cfg = self.config
    e = cfg.embedding_size
    pos = jnp.asarray(sine_position_encoding(e, e, cfg.mem_dim)).reshape(1, e * e, cfg.mem_dim)
    return pos + self.maskmem_tpos_enc.astype(jnp.float32).reshape(cfg.num_maskmem, 1, cfg.mem_dim)

  def condition_on_memory(self, embed: jax.Array, cond_mem: jax.Array, mems: jax.Array, mem_valid: jax.Array,
                          ptrs: jax.Array, ptr_valid: jax.Array) -> jax.Array:
    """`_prepare_memory_conditioned_features` for a frame after the conditioning one, on a fixed-shape memory.

    embed (B, h, w, C): the frame's embedding (no `no_mem_embed`). cond_mem (B, h*w, mem_dim): the conditioning
    frame's memory. mems (B, num_maskmem - 1, h*w, mem_dim): slot k holds the frame k + 1 frames back, valid
    where mem_valid (B, num_maskmem - 1). ptrs (B, P, C) object pointers (the conditioning frame's and earlier
    frames'), valid where ptr_valid (B, P); each becomes C / mem_dim tokens without position encoding or RoPE.
    Returns the memory-conditioned embedding (B, h, w, C)."""
    cfg = self.config
    b, h, w, c = embed.shape
    hw, md, n = h * w, cfg.mem_dim, cfg.num_maskmem
    pos = self.memory_pos()
    spatial = jnp.concatenate([cond_mem[:, None], mems], axis=1)                        # (B, n, hw, md)
    spatial_pos = jnp.concatenate([pos[n - 1:], pos[:n - 1]], axis=0)                    # (n, hw, md)
    spatial_ok = jnp.concatenate([jnp.ones((b, 1), bool), mem_valid], axis=1)           # (B, n)
    split = c // md
    ptr_tokens = ptrs.astype(jnp.float32).reshape(b, ptrs.shape[1] * split, md)
    memory = jnp.concatenate([spatial.reshape(b, n * hw, md), ptr_tokens], axis=1)
    memory_pos = jnp.concatenate([jnp.broadcast_to(spatial_pos.reshape(1, n * hw, md), (b, n * hw, md)),
                                  jnp.zeros_like(ptr_tokens)], axis=1)
    key_mask = jnp.concatenate([jnp.repeat(spatial_ok, hw, axis=1), jnp.repeat(ptr_valid, split, axis=1)], axis=1)
    dt = self.dtype or jnp.float32
    curr_pos = jnp.asarray(sine_position_encoding(h, w, c)).reshape(1, hw, c)
    out = self.memory_attention(embed.reshape(b, hw, c).astype(dt), curr_pos.astype(dt), memory.astype(dt),
                                memory_pos.astype(dt), num_obj_ptr_tokens=ptr_tokens.shape[1], key_mask=key_mask)
    return out.reshape(b, h, w, c)

  def track_frame(self, embed, high_res_feats, cond_mem, mems, mem_valid, ptrs, ptr_valid) -> dict[str, jax.Array]:
    """One frame after the conditioning frame (`track_step` with no prompt): memory attention
    (`condition_on_memory`), the SAM heads without a prompt (`sam_heads`), and the frame's own memory from its
    gated, not hole-filled, logits resized to image size (sigmoid, not binarized). Returns `sam_heads`'s dict
    plus "memory" (B, h*w, mem_dim)."""
    pix = self.condition_on_memory(embed, cond_mem, mems, mem_valid, ptrs, ptr_valid)
    out = self.sam_heads(pix, high_res_feats)
    out["memory"] = self.encode_memory(embed, self.upsample_to_image(out["low_res"]), binarize=False)
    return out

  def __call__(self, images: jax.Array, points=None, boxes=None, masks=None, extra_sparse=None,
               multimask_output: bool = False):
    """Image encoder then decoder (also what `init` traces, so every parameter is created: on init, the video
    modules run once on the features too)."""
    raw, high_res = self.image_features(images)
    embed = self.add_no_mem_embed(raw)
    if self.is_initializing():
      cfg, b = self.config, raw.shape[0]
      hw = cfg.embedding_size ** 2
      self.track_frame(raw, high_res, jnp.zeros((b, hw, cfg.mem_dim)),
                       jnp.zeros((b, cfg.num_maskmem - 1, hw, cfg.mem_dim)), jnp.ones((b, cfg.num_maskmem - 1), bool),
                       jnp.zeros((b, 1, cfg.d_model)), jnp.ones((b, 1), bool))
      self.mask_downsample(jnp.zeros((b, cfg.image_size, cfg.image_size, 1), raw.dtype))
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
  return nn.unbox(runtime.jit_init(lambda r: model.init(r, **inputs)["params"])(rng))
