"""The SAM model: image encoder + prompt encoder + mask decoder, with the image embedding reusable
across prompts (`embed_image` once, `decode` many times)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import runtime
from evf_jax.sam.config import SamConfig
from evf_jax.sam.image_encoder import ImageEncoderViT
from evf_jax.sam.mask_decoder import MaskDecoder
from evf_jax.sam.prompt_encoder import PromptEncoder

Dtype = Any


class Sam(nn.Module):
  config: SamConfig
  attention: str = "xla"  # None (best available) | "xla" | "cudnn"
  remat: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.image_encoder = ImageEncoderViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, out_chans=cfg.prompt_embed_dim,
        window_size=cfg.window_size, global_attn_indexes=tuple(cfg.global_attn_indexes),
        attention=self.attention, remat=self.remat, **kw)
    e = cfg.embedding_size
    self.prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
        input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans, **kw)
    self.mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        transformer_depth=cfg.decoder_depth, transformer_num_heads=cfg.decoder_num_heads,
        transformer_mlp_dim=cfg.decoder_mlp_dim, attention_downsample_rate=cfg.attention_downsample_rate,
        # The decoder's attentions are tiny (a few tokens against 4096): XLA's, also when the encoders use cuDNN.
        attention="xla" if self.attention == "cudnn" else self.attention, **kw)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """(B, S, S, 3) normalised, padded images (see `transforms.preprocess`) -> (B, S/16, S/16, C)."""
    return self.image_encoder(images)

  def encode_prompts(self, points=None, boxes=None, masks=None, extra_sparse=None):
    """-> sparse (B, N, C), dense (B, h, w, C); see `PromptEncoder.__call__`."""
    return self.prompt_encoder(points, boxes, masks, extra_sparse)

  def get_dense_pe(self) -> jax.Array:
    return self.prompt_encoder.get_dense_pe()

  def decode(self, image_embeddings: jax.Array, points: Optional[tuple[jax.Array, jax.Array]] = None,
             boxes: Optional[jax.Array] = None, masks: Optional[jax.Array] = None,
             extra_sparse: Optional[jax.Array] = None,
             multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """Masks for prompts on (cached) image embeddings.

    Args:
      image_embeddings: (1 or B, h, w, C) from `embed_image`; one image is shared by all B prompts.
      points: (coords (B, N, 2) (x, y) in the resized-input frame, labels (B, N): 1 fg, 0 bg, -1 pad).
      boxes: (B, 4) (x0, y0, x1, y1) in the resized-input frame.
      masks: (B, 1, 4h, 4w) mask logits, e.g. an earlier low-res output.
      extra_sparse: (B, n, C) extra prompt embeddings (EVF-SAM's projected text feature).
      multimask_output: static.

    Returns:
      low-res mask logits (B, M, 4h, 4w) (256x256 for released sizes) and IoU predictions (B, M).
    """
    sparse, dense = self.prompt_encoder(points, boxes, masks, extra_sparse)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                             multimask_output)

  def __call__(self, images: jax.Array, points=None, boxes=None, masks=None, extra_sparse=None,
               multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """Image encoder then decoder (also what `init` traces, so every parameter is created)."""
    return self.decode(self.embed_image(images), points, boxes, masks, extra_sparse, multimask_output)


def dummy_inputs(config: SamConfig, batch: int = 1) -> dict[str, Any]:
  """Inputs that reach every parameter (a mask prompt is needed for `mask_downscaling`)."""
  s, lr = config.img_size, config.low_res_size
  return dict(images=jnp.zeros((batch, s, s, 3), jnp.float32),
              points=(jnp.zeros((batch, 1, 2), jnp.float32), jnp.ones((batch, 1), jnp.int32)),
              masks=jnp.zeros((batch, 1, lr, lr), jnp.float32))


def _init_fn(config: SamConfig, param_dtype: Dtype):
  model = Sam(config, param_dtype=param_dtype)
  return lambda rng: model.init(rng, **dummy_inputs(config))["params"]


def abstract_params(config: SamConfig, *, param_dtype: Dtype = jnp.float32, boxed: bool = False) -> dict[str, Any]:
  """The parameter tree as ShapeDtypeStructs (no memory). `boxed` keeps the logical-axis metadata."""
  tree = jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))
  return tree if boxed else nn.unbox(tree)


def init_params(config: SamConfig, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> dict[str, Any]:
  """Randomly initialised (unboxed) params."""
  return nn.unbox(runtime.jit_init(_init_fn(config, param_dtype))(rng))
