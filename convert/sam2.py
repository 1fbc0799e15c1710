"""PyTorch SAM-2 state dicts (Meta's `sam2_hiera_*.pt` `model` dict, or EVF-SAM2's `visual_model.*`) -> Flax
params of `evf_jax.sam2.Sam2` (image path and video memory).

Flax names mirror the torch attribute paths (`blocks.3` -> `blocks_3`), with three renames: the prompt
encoder and the SAM-1 parts of the mask decoder use SAM-1's table (`convert.sam`, re-rooted under
`sam_prompt_encoder` / `sam_mask_decoder`); SAM-2's two-layer MLPs (`mlp.layers.0/1`, in Hiera blocks and
in the two-way transformer) are SAM-1's `MLPBlock` (`mlp/lin1`, `mlp/lin2`), the same Linear-act-Linear; the
neck's `convs.K.conv` is `neck/convs_K`. The Hiera background position embedding stays in torch's (1, C, h, w)
layout. The memory encoder's layer scale is `gamma` in Meta's checkpoints and `weight` in EVF-SAM2's (EVF renamed
the attribute, because Hugging Face's loader rewrites any key containing "gamma"); both names are read, and a
checkpoint holding both fails as a target filled twice.

Only SAM 2.0 is supported (what EVF-SAM2 builds on): the tensors SAM 2.1 adds (`no_obj_embed_spatial`,
`obj_ptr_tpos_proj.*`) are unexpected keys, so a 2.1 checkpoint is refused rather than run with the 2.0 flow
(`refuse_sam21` says so in one line, for callers that check a file before converting it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.rules import ConversionError, ConversionResult, Rule, convert, strip_prefix
from convert.sam import _layer, _ln, sam_rules
from evf_jax.sam2.config import SAM2_CONFIGS, Sam2Config
from evf_jax.sam2.sam2_base import abstract_params

# SAM2Base tensors only the video predictor uses (2.0 names): converted, but an image-only consumer may want
# to know them.
VIDEO_ONLY: tuple[str, ...] = (
    r"memory_attention\..*", r"memory_encoder\..*", r"maskmem_tpos_enc", r"no_mem_pos_enc", r"no_obj_ptr",
    r"obj_ptr_proj\..*", r"mask_downsample\..*",
)


def _rerooted(rules: list[Rule], old: str, new: str) -> list[Rule]:
  """The rules under SAM-1's module `old`, moved to SAM-2's `new` (source and target)."""
  return [Rule(new + r.pattern[len(old):], new + r.target[len(old):], r.transform)
          for r in rules if r.pattern.startswith(old + r"\.")]


def _mlp_block(src: str, dst: str) -> list[Rule]:
  """SAM-2's 2-layer `MLP` (`layers.0`, `layers.1`) -> SAM-1's `MLPBlock` (`lin1`, `lin2`)."""
  return [*_layer(rf"{src}\.layers\.0", f"{dst}/lin1", "linear"),
          *_layer(rf"{src}\.layers\.1", f"{dst}/lin2", "linear")]


def sam2_rules(layer_scale: str = "gamma") -> list[Rule]:
  """The full SAM-2 table (image path and video memory): source regex (whole key) -> flax path, named
  transform. Both names of the memory fuser's layer scale convert; `layer_scale` is the one written back
  (Meta's `gamma`; EVF-SAM2's checkpoints say `weight`)."""
  trunk, md = r"image_encoder\.trunk", r"sam_mask_decoder"
  blk = rf"{trunk}\.blocks\.(\d+)"
  sam1 = sam_rules()
  return [
      # Hiera trunk.
      *_layer(rf"{trunk}\.patch_embed\.proj", "image_encoder/trunk/patch_embed/proj", "conv2d"),
      Rule(rf"{trunk}\.(pos_embed|pos_embed_window)", r"image_encoder/trunk/\1"),
      *_ln(rf"{blk}\.(norm[12])", r"image_encoder/trunk/blocks_\1/\2"),
      *_layer(rf"{blk}\.attn\.(qkv|proj)", r"image_encoder/trunk/blocks_\1/attn/\2", "linear"),
      *_layer(rf"{blk}\.proj", r"image_encoder/trunk/blocks_\1/proj", "linear"),
      *_mlp_block(rf"{blk}\.mlp", r"image_encoder/trunk/blocks_\1/mlp"),
      # FPN neck (the sine position encodings have no parameters).
      *_layer(r"image_encoder\.neck\.convs\.(\d+)\.conv", r"image_encoder/neck/convs_\1", "conv2d"),
      # Prompt encoder: SAM-1's.
      *_rerooted(sam1, "prompt_encoder", "sam_prompt_encoder"),
      # Mask decoder: SAM-1's without its two-way MLP (`lin1`/`lin2`: SAM-2 names it `layers.0`/`layers.1`),
      # plus the SAM-2 parts.
      *(r for r in _rerooted(sam1, "mask_decoder", "sam_mask_decoder") if "/mlp/" not in r.target),
      *_mlp_block(rf"{md}\.transformer\.layers\.(\d+)\.mlp", r"sam_mask_decoder/transformer/layers_\1/mlp"),
      Rule(rf"{md}\.obj_score_token\.weight", "sam_mask_decoder/obj_score_token"),
      *_layer(rf"{md}\.pred_obj_score_head", "sam_mask_decoder/pred_obj_score_head", "linear"),  # a Linear
      *_layer(rf"{md}\.pred_obj_score_head\.layers\.(\d+)", r"sam_mask_decoder/pred_obj_score_head/layers_\1",
              "linear"),  # or an MLP (pred_obj_scores_mlp)
      *_layer(rf"{md}\.(conv_s[01])", r"sam_mask_decoder/\1", "conv2d"),
      Rule(r"no_mem_embed", "no_mem_embed"),
      *video_rules(layer_scale),
  ]


def video_rules(layer_scale: str = "gamma") -> list[Rule]:
  """Memory attention, memory encoder, object pointers and temporal encodings."""
  ma, me = r"memory_attention", r"memory_encoder"
  lay = rf"{ma}\.layers\.(\d+)"
  ds = rf"{me}\.mask_downsampler\.encoder"
  fl = rf"{me}\.fuser\.layers\.(\d+)"
  other_name = {"gamma": "weight", "weight": "gamma"}[layer_scale]
  return [
      *_layer(rf"{lay}\.(self_attn|cross_attn_image)\.(q_proj|k_proj|v_proj|out_proj)",
              r"memory_attention/layers_\1/\2/\3", "linear"),
      *_layer(rf"{lay}\.(linear[12])", r"memory_attention/layers_\1/\2", "linear"),
      *_ln(rf"{lay}\.(norm[123])", r"memory_attention/layers_\1/\2"),
      *_ln(rf"{ma}\.norm", "memory_attention/norm"),
      *_layer(rf"{ds}\.(0|3|6|9|12)", r"memory_encoder/mask_downsampler/encoder_\1", "conv2d"),
      *_ln(rf"{ds}\.(1|4|7|10)", r"memory_encoder/mask_downsampler/encoder_\1"),
      *_layer(rf"{me}\.(pix_feat_proj|out_proj)", r"memory_encoder/\1", "conv2d"),
      *_layer(rf"{fl}\.dwconv", r"memory_encoder/fuser/layers_\1/dwconv", "conv2d"),
      *_ln(rf"{fl}\.norm", r"memory_encoder/fuser/layers_\1/norm"),
      *_layer(rf"{fl}\.(pwconv[12])", r"memory_encoder/fuser/layers_\1/\2", "linear"),
      Rule(rf"{fl}\.(?:{layer_scale}|{other_name})", r"memory_encoder/fuser/layers_\1/gamma"),
      Rule(r"(maskmem_tpos_enc|no_mem_pos_enc|no_obj_ptr)", r"\1"),
      *_layer(r"obj_ptr_proj\.layers\.(\d+)", r"obj_ptr_proj/layers_\1", "linear"),
      *_layer(r"mask_downsample", "mask_downsample", "conv2d"),
  ]


# Tensors only SAM 2.1 has (`sam2.1_hiera_*.yaml`: `no_obj_embed_spatial`, `proj_tpos_enc_in_obj_ptrs`).
SAM21_ONLY: tuple[str, ...] = (r"no_obj_embed_spatial", r"obj_ptr_tpos_proj\..*")


def refuse_sam21(state_dict: Mapping[str, Any], prefix: str = "", what: str = "SAM-2 weights") -> None:
  """One line for a SAM 2.1 checkpoint, before converting it: the strict conversion would list its extra
  tensors as unexpected keys, which does not say what is wrong with the file. Every SAM-2 conversion (Meta's
  file, EVF-SAM2's `visual_model.`) calls it."""
  rx = re.compile(re.escape(prefix) + "(?:" + "|".join(SAM21_ONLY) + ")")
  extra = sorted(k for k in state_dict if rx.fullmatch(k))
  if extra:
    raise ConversionError([f"a SAM 2.1 checkpoint (it holds {', '.join(extra)}); only SAM 2.0 is supported, "
                           "which EVF-SAM2 builds on (sam2_hiera_*.pt, not sam2.1_hiera_*.pt)"], what=what)


def convert_sam2_result(state_dict: Mapping[str, np.ndarray], config: Sam2Config, prefix: str = "",
                        dtype: Any = None) -> ConversionResult:
  """Like `convert_sam2`, also returning the flax-path -> (source key, transform) mapping (for `revert`)."""
  what = f"SAM-2 {config.name} weights" + (f" (under {prefix!r})" if prefix else "")
  sd = strip_prefix(state_dict, prefix) if prefix else dict(state_dict)
  if prefix and not sd:
    raise ConversionError([f"no keys start with the prefix {prefix!r}"], what=what)
  refuse_sam21(sd, what=what)
  return convert(sd, sam2_rules(), abstract_params(config), dtype=dtype, what=what)


def convert_sam2(state_dict: Mapping[str, np.ndarray], config: Sam2Config, prefix: str = "",
                 dtype: Any = None) -> dict[str, Any]:
  """The params of `Sam2(config)` from a flat torch SAM-2 state dict ({key: numpy array}, e.g. from
  `convert.io.load_state_dict`, which unwraps Meta's "model" dict). Keys outside `prefix` (EVF-SAM2:
  "visual_model.") are skipped; floating tensors are cast to
  `dtype` (default: the params' float32). Raises one `ConversionError` listing every unmatched key, unfilled
  parameter and shape mismatch."""
  return convert_sam2_result(state_dict, config, prefix, dtype).params


def infer_sam2_size(state_dict: Mapping[str, Any], prefix: str = "") -> str:
  """The released size ("hiera_t" / "hiera_s" / "hiera_b+" / "hiera_l") whose trunk width and depth the tensors
  have."""
  key = f"{prefix}image_encoder.trunk.patch_embed.proj.weight"
  if key not in state_dict:
    raise ConversionError([f"{key!r} is missing: not a SAM-2 state dict (or the prefix is wrong)"],
                          what="SAM-2 weights")
  embed = int(np.shape(state_dict[key])[0])
  rx = re.compile(re.escape(prefix) + r"image_encoder\.trunk\.blocks\.(\d+)\.")
  depth = len({m.group(1) for k in state_dict if (m := rx.match(k))})
  for name, cfg in SAM2_CONFIGS.items():
    if name != "toy" and (cfg.embed_dim, cfg.depth) == (embed, depth):
      return name
  known = ", ".join(f"{n} {c.embed_dim}x{c.depth}" for n, c in SAM2_CONFIGS.items() if n != "toy")
  raise ConversionError([(f"a Hiera trunk of width {embed} and depth {depth} is none of the released sizes "
                         f"({known})")], what="SAM-2 weights")
