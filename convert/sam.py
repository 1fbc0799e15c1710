"""PyTorch SAM state dicts (official `sam_vit_*.pth`, or EVF-SAM's `visual_model.*`) -> Flax params.

Flax module names mirror torch attribute paths with `_` before indices (`blocks.3` -> `blocks_3`), so the
table is close to the identity; each rule names its layout transform explicitly.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from convert.rules import ConversionError, ConversionResult, Rule, convert, strip_prefix
from evf_jax.sam.config import SAM_CONFIGS, SamConfig
from evf_jax.sam.sam import abstract_params


def _ln(src: str, dst: str) -> list[Rule]:
  return [Rule(rf"{src}\.weight", f"{dst}/scale"), Rule(rf"{src}\.bias", f"{dst}/bias")]


def _layer(src: str, dst: str, transform: str) -> list[Rule]:
  """A torch Linear/Conv (weight + bias) -> flax kernel + bias."""
  return [Rule(rf"{src}\.weight", f"{dst}/kernel", transform), Rule(rf"{src}\.bias", f"{dst}/bias")]


def sam_rules() -> list[Rule]:
  """The full SAM table: source regex (whole key) -> flax path, named transform."""
  ie, pe, md = r"image_encoder", r"prompt_encoder", r"mask_decoder"
  blk = rf"{ie}\.blocks\.(\d+)"
  attn = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
  tl = rf"{md}\.transformer\.layers\.(\d+)"
  rules: list[Rule] = [
      # Image encoder.
      *_layer(rf"{ie}\.patch_embed\.proj", "image_encoder/patch_embed/proj", "conv2d"),
      Rule(rf"{ie}\.pos_embed", "image_encoder/pos_embed"),
      *_ln(rf"{blk}\.(norm[12])", r"image_encoder/blocks_\1/\2"),
      *_layer(rf"{blk}\.attn\.(qkv|proj)", r"image_encoder/blocks_\1/attn/\2", "linear"),
      Rule(rf"{blk}\.attn\.(rel_pos_[hw])", r"image_encoder/blocks_\1/attn/\2"),
      *_layer(rf"{blk}\.mlp\.(lin[12])", r"image_encoder/blocks_\1/mlp/\2", "linear"),
      Rule(rf"{ie}\.neck\.([02])\.weight", r"image_encoder/neck_\1/kernel", "conv2d"),  # no bias
      *_ln(rf"{ie}\.neck\.([13])", r"image_encoder/neck_\1"),
      # Prompt encoder. nn.Embedding(n, C).weight tables map as they are.
      Rule(rf"{pe}\.pe_layer\.positional_encoding_gaussian_matrix",
           "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"),
      Rule(rf"{pe}\.point_embeddings\.(\d)\.weight", r"prompt_encoder/point_embeddings_\1"),
      Rule(rf"{pe}\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder/\1"),
      *_layer(rf"{pe}\.mask_downscaling\.([036])", r"prompt_encoder/mask_downscaling_\1", "conv2d"),
      *_ln(rf"{pe}\.mask_downscaling\.([14])", r"prompt_encoder/mask_downscaling_\1"),
      # Mask decoder: two-way transformer.
      *_layer(rf"{tl}\.{attn}\.([qkv]_proj|out_proj)", r"mask_decoder/transformer/layers_\1/\2/\3", "linear"),
      *_ln(rf"{tl}\.(norm[1-4])", r"mask_decoder/transformer/layers_\1/\2"),
      *_layer(rf"{tl}\.mlp\.(lin[12])", r"mask_decoder/transformer/layers_\1/mlp/\2", "linear"),
      *_layer(rf"{md}\.transformer\.final_attn_token_to_image\.([qkv]_proj|out_proj)",
              r"mask_decoder/transformer/final_attn_token_to_image/\1", "linear"),
      *_ln(rf"{md}\.transformer\.norm_final_attn", "mask_decoder/transformer/norm_final_attn"),
      # Mask decoder: tokens, upscaling, heads.
      Rule(rf"{md}\.(iou_token|mask_tokens)\.weight", r"mask_decoder/\1"),
      *_layer(rf"{md}\.output_upscaling\.([03])", r"mask_decoder/output_upscaling_\1", "conv_transpose2d"),
      *_ln(rf"{md}\.output_upscaling\.(1)", r"mask_decoder/output_upscaling_\1"),
      *_layer(rf"{md}\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)",
              r"mask_decoder/output_hypernetworks_mlps_\1/layers_\2", "linear"),
      *_layer(rf"{md}\.iou_prediction_head\.layers\.(\d+)", r"mask_decoder/iou_prediction_head/layers_\1",
              "linear"),
  ]
  return rules


# Nothing is dropped on purpose: Sam.pixel_mean/pixel_std are non-persistent buffers, never in a state dict.
SAM_IGNORE: tuple[str, ...] = ()


def _target(config: SamConfig) -> dict[str, Any]:
  return abstract_params(config)


def convert_sam_result(state_dict: Mapping[str, np.ndarray], config: SamConfig, prefix: str = "",
                       dtype: Optional[Any] = None) -> ConversionResult:
  """Like `convert_sam`, also returning the flax-path -> (source key, transform) mapping (for `revert`)."""
  sd = dict(state_dict)
  if prefix:
    sd = strip_prefix(sd, prefix)
    if not sd:
      raise ConversionError([f"no keys start with the prefix {prefix!r}"], what=f"SAM {config.name} weights")
  return convert(sd, sam_rules(), _target(config), ignore=SAM_IGNORE, dtype=dtype,
                 what=f"SAM {config.name} weights" + (f" (under {prefix!r})" if prefix else ""))


def convert_sam(state_dict: Mapping[str, np.ndarray], config: SamConfig, prefix: str = "",
                dtype: Optional[Any] = None) -> dict[str, Any]:
  """Converts a torch SAM state dict to the params of `Sam(config)`.

  Args:
    state_dict: flat {key: numpy array} (see `convert.io.load_state_dict`).
    config: the SAM size the weights are for.
    prefix: keys outside it are skipped and it is removed from the rest (EVF-SAM: "visual_model.").
    dtype: cast floating tensors to this dtype (default: float32, the params' dtype).

  Raises:
    ConversionError: once, listing every unmatched source key, unfilled parameter and shape mismatch.
  """
  return convert_sam_result(state_dict, config, prefix, dtype).params


def infer_sam_size(state_dict: Mapping[str, Any], prefix: str = "") -> str:
  """The released size ("vit_b" / "vit_l" / "vit_h") whose embed dim and depth the tensors have."""
  key = f"{prefix}image_encoder.patch_embed.proj.weight"
  if key not in state_dict:
    raise ConversionError([f"{key!r} is missing: not a SAM state dict (or the prefix is wrong)"],
                          what="SAM weights")
  embed = int(np.shape(state_dict[key])[0])
  rx = re.compile(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.")
  depth = len({m.group(1) for k in state_dict if (m := rx.match(k))})
  for name, cfg in SAM_CONFIGS.items():
    if name != "tiny" and (cfg.embed_dim, cfg.depth) == (embed, depth):
      return name
  raise ConversionError([f"image encoder of width {embed} and depth {depth} is none of the released "
                         "sizes (vit_b 768x12, vit_l 1024x24, vit_h 1280x32)"], what="SAM weights")
