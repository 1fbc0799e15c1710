"""Building the PyPI segment-anything (PyTorch) reference from one of our `SamConfig`s, as
`segment_anything/build_sam.py` builds the released sizes, with seeded random weights."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from evf_jax.sam.config import SamConfig
from evf_testing import torch_reference as tr


def build_torch_sam(cfg: SamConfig, seed: Optional[int] = 0):
  """The torch Sam for `cfg`; weights re-drawn with `seed` (None: left as built, e.g. on the meta device)."""
  import torch
  m = tr.segment_anything_modeling()
  e = cfg.embedding_size
  sam = m.Sam(
      image_encoder=m.ImageEncoderViT(
          depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.num_heads,
          patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
          global_attn_indexes=list(cfg.global_attn_indexes), window_size=cfg.window_size,
          out_chans=cfg.prompt_embed_dim),
      prompt_encoder=m.PromptEncoder(
          embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
          input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
      mask_decoder=m.MaskDecoder(
          num_multimask_outputs=cfg.num_multimask_outputs,
          transformer=m.TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
          transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
          iou_head_hidden_dim=cfg.iou_head_hidden_dim),
      pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std))
  sam.eval()
  if seed is None:
    return sam
  tr.randomize_(sam, seed)
  # randomize_ re-draws buffers too; pixel_mean/std are constants of the model, not weights.
  with torch.no_grad():
    sam.pixel_mean.copy_(torch.tensor(cfg.pixel_mean).view(-1, 1, 1))
    sam.pixel_std.copy_(torch.tensor(cfg.pixel_std).view(-1, 1, 1))
  return sam


def to_np(t) -> np.ndarray:
  return t.detach().cpu().numpy()


def nchw_to_nhwc(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))
