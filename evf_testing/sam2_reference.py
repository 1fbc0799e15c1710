"""Building the PyPI sam2 1.1.0 (PyTorch) reference from one of our `Sam2Config`s, as `sam2.build_sam.build_sam2`
builds the released sizes (hydra config + the postprocessing overrides), with seeded random weights.

A released preset is built from its own yaml (`configs/sam2/sam2_hiera_*.yaml`, SAM 2.0) unchanged; other
configs (`toy`) start from Hiera-T's yaml with the trunk, neck and image size overridden.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import numpy as np

from evf_jax.sam2.config import Sam2Config
from evf_testing import torch_reference as tr

YAMLS = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}


@contextlib.contextmanager
def xla_optimizations():
  """XLA's optimizations on inside (tests/conftest.py's `fast_compile` turns them off for modules of toy models):
  a full-size model runs many times slower without them."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def sam2_package():
  """Imports `sam2` (skipping the test when it is not installed); its import initialises hydra's config store."""
  import pytest
  tr.import_torch()
  return pytest.importorskip("sam2")


def _yaml_and_overrides(cfg: Sam2Config) -> tuple[str, list[str]]:
  if cfg.name in YAMLS:
    return f"configs/sam2/sam2_hiera_{YAMLS[cfg.name]}.yaml", []
  lst = lambda v: "[" + ",".join(str(x) for x in v) + "]"
  trunk, neck = "++model.image_encoder.trunk", "++model.image_encoder.neck"
  return "configs/sam2/sam2_hiera_t.yaml", [
      f"++model.image_size={cfg.image_size}",
      f"{trunk}.embed_dim={cfg.embed_dim}", f"{trunk}.num_heads={cfg.num_heads}",
      f"{trunk}.stages={lst(cfg.stages)}", f"{trunk}.global_att_blocks={lst(cfg.global_att_blocks)}",
      f"{trunk}.window_spec={lst(cfg.window_spec)}",
      f"{trunk}.window_pos_embed_bkg_spatial_size={lst(cfg.window_pos_embed_bkg_spatial_size)}",
      f"{neck}.d_model={cfg.d_model}", f"{neck}.backbone_channel_list={lst(cfg.channel_list)}",
      # The yaml sizes the neck's sine encoding on its own (256); ours is d_model wide, as in every released size.
      f"{neck}.position_encoding.num_pos_feats={cfg.d_model}",
      *_memory_overrides(cfg),
  ]


def _memory_overrides(cfg: Sam2Config) -> list[str]:
  """The video memory of a non-released config: the yaml fixes its widths at 256 / 64, ours follow d_model and
  mem_dim."""
  ma, me, d = "++model.memory_attention", "++model.memory_encoder", cfg.d_model
  out = [f"{ma}.d_model={d}", f"{ma}.num_layers={cfg.memory_attention_layers}", f"{ma}.layer.d_model={d}",
         f"{ma}.layer.dim_feedforward={cfg.memory_attention_mlp_dim}",
         f"{ma}.layer.cross_attention.kv_in_dim={cfg.mem_dim}",
         f"{me}.out_dim={cfg.mem_dim}", f"{me}.in_dim={d}", f"{me}.position_encoding.num_pos_feats={cfg.mem_dim}",
         f"{me}.mask_downsampler.embed_dim={d}", f"{me}.fuser.layer.dim={d}", f"{me}.fuser.num_layers={cfg.fuser_layers}",
         f"++model.num_maskmem={cfg.num_maskmem}", f"++model.max_obj_ptrs_in_encoder={cfg.max_obj_ptrs_in_encoder}"]
  for a in ("self_attention", "cross_attention"):
    out += [f"{ma}.layer.{a}.embedding_dim={d}", f"{ma}.layer.{a}.num_heads={cfg.memory_attention_heads}",
            f"{ma}.layer.{a}.rope_theta={cfg.rope_theta}"]
  return out


def compose_config(cfg: Sam2Config, extra_overrides: tuple[str, ...] = ()) -> Any:
  """The resolved hydra config `build_sam2` would instantiate for `cfg` (postprocessing overrides included)."""
  sam2_package()
  from hydra import compose
  from omegaconf import OmegaConf
  yaml, overrides = _yaml_and_overrides(cfg)
  overrides += list(extra_overrides)
  overrides += [
      "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
      "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
      "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
  ]
  composed = compose(config_name=yaml, overrides=overrides)
  OmegaConf.resolve(composed)
  return composed


def build_torch_sam2(cfg: Sam2Config, seed: int | None = 0, device: str = "cpu",
                     extra_overrides: tuple[str, ...] = ()):
  """The torch `SAM2Base` for `cfg` in eval mode; weights re-drawn with `seed` (None: left as built, e.g. on
  device="meta" to read the state dict's names and shapes without memory)."""
  import torch
  from hydra.utils import instantiate
  composed = compose_config(cfg, extra_overrides)
  with torch.device(device):
    model = instantiate(composed.model, _recursive_=True)
  model.eval()
  if seed is not None:
    tr.randomize_(model, seed)
  return model


def build_torch_evf_sam2(config, seed: int = 0):
  """An nn.Module whose state dict has EVF-SAM2's key layout (`visual_model.*` = SAM2Base, BEiT-3, projector),
  with seeded random weights; `config` is an `evf_jax.evf_sam2.EvfSam2Config`. EVF-SAM's reference with its
  SAM swapped: built around the toy SAM-1 (a throwaway), whose `visual_model` is then replaced."""
  from evf_jax.sam.config import SAM_CONFIGS
  from evf_testing.evf_reference import build_torch_evf
  shell = types.SimpleNamespace(sam=SAM_CONFIGS["tiny"], beit3=config.beit3, hidden_size=config.hidden_size,
                                out_dim=config.out_dim)
  model = build_torch_evf(shell, seed)
  model.visual_model = build_torch_sam2(config.sam2, seed)
  return model.eval()


def sam2_input(image, image_size: int, mean, std):
  """(1, 3, S, S) float tensor as EVF-SAM2's inference (`sam_preprocess(model_type="sam2")`): torch's bilinear
  resize of the *uint8* image to S x S (its fixed-point kernel, rounded to uint8), then normalised."""
  import torch
  x = torch.from_numpy(image).permute(2, 0, 1).contiguous()[None]
  x = torch.nn.functional.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
  return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def sam2_eval_input(image, image_size: int, mean, std):
  """(1, 3, S, S) float tensor as EVF-SAM2's eval.py (`utils/dataset.py` `Resize`): torchvision's
  `resize(to_pil_image(image), (S, S))`, which is PIL's bilinear resize (antialiased when shrinking), then
  normalised; no padding."""
  import torch
  from PIL import Image
  resized = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR))
  x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()[None]
  return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def reference_sam2_maps(sam, sam_x):
  """SAM-2's image features as EVF-SAM2 decodes them: the levels as (B, C, h, w) maps, the
  last (lowest-resolution) one with `no_mem_embed` added. Call under `torch.no_grad()`."""
  _, feats, _, sizes = sam._prepare_backbone_features(sam.forward_image(sam_x))
  feats[-1] = feats[-1] + sam.no_mem_embed
  return [f.permute(1, 2, 0).reshape(f.shape[1], -1, *s) for f, s in zip(feats, sizes)]


def reference_text_feature(model, beit_x, input_ids, attention_mask=None):
  """The reference's sparse prompt: BEiT-3 on (image, ids), its CLS through `text_hidden_fcs`, (N, 1, C). Without
  `attention_mask` no token is masked (`inference()`); with it (N, L), True at real tokens, the rest are."""
  import torch
  ids = torch.from_numpy(np.asarray(input_ids, np.int64)).to(beit_x.device)
  padding = (torch.zeros_like(ids) if attention_mask is None
             else ~torch.from_numpy(np.asarray(attention_mask, bool)).to(beit_x.device))
  out = model.mm_extractor.beit3(visual_tokens=beit_x.expand(ids.shape[0], -1, -1, -1), textual_tokens=ids,
                                 text_padding_position=padding)
  return model.text_hidden_fcs[0](out["encoder_out"][:, :1])


def reference_sam2_decode(sam, maps, feat):
  """SAM-2's mask decoder as EVF-SAM2 calls it: `feat` (N, 1, C) the only sparse prompt, no mask prompt, multimask
  output, the high-resolution levels of `maps` (`reference_sam2_maps`). Returns (low-res logits (N, 3, h, w),
  iou (N, 3))."""
  pe = sam.sam_prompt_encoder
  h, w = pe.image_embedding_size
  dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(feat.shape[0], -1, h, w)
  low, iou, _, _ = sam.sam_mask_decoder(image_embeddings=maps[-1], image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=feat, dense_prompt_embeddings=dense,
                                        multimask_output=True, repeat_image=True, high_res_features=maps[:-1])
  return low, iou


def reference_evf_sam2(model, sam_x, beit_x, input_ids, original_hw, attention_mask=None):
  """EVF-SAM2's image inference on prepared inputs: SAM-2 features (no_mem_embed added), BEiT-3 on
  (image, ids) without a padding mask (`inference()`; with `attention_mask` (N, L), True at real tokens, BEiT-3
  masks the rest as `forward()` does in eval.py), the projected CLS as the only sparse prompt, multimask
  decoding, the best of 3 by predicted IoU, bilinear to `original_hw`. Returns (logits (N, H, W), best low-res
  (N, 1, h, w), iou (N, 3)) as numpy."""
  import torch
  sam = model.visual_model
  with torch.no_grad():
    maps = reference_sam2_maps(sam, sam_x)
    feat = reference_text_feature(model, beit_x, input_ids, attention_mask)
    low, iou = reference_sam2_decode(sam, maps, feat)
    order = torch.argsort(iou, dim=-1, descending=True)
    best = torch.take_along_dim(low, order[..., None, None], dim=1)[:, :1]
    full = torch.nn.functional.interpolate(best.float(), original_hw, mode="bilinear", align_corners=False)
  return full[:, 0].cpu().numpy(), best.float().cpu().numpy(), iou.float().cpu().numpy()


def build_torch_video_predictor(cfg: Sam2Config, seed: int = 0, fill_hole_area: int = 8):
  """sam2's (device-agnostic) legacy `SAM2VideoPredictor` with EVF-SAM2's video overrides
  (`binarize_mask_from_pts_for_mem_enc`, `fill_hole_area`), seeded random weights. Its state dict is a
  SAM2Base's."""
  return build_torch_sam2(cfg, seed, extra_overrides=(
      "++model._target_=sam2.sam2_video_predictor_legacy.SAM2VideoPredictor",
      "++model.binarize_mask_from_pts_for_mem_enc=true", f"++model.fill_hole_area={fill_hole_area}"))


def connected_components_bruteforce(mask):
  """What sam2's CUDA `get_connected_components` returns, by breadth-first search on the CPU: for a (N, 1, H, W)
  mask, 8-connected labels (1, 2, ... per map; 0 on background) and each foreground pixel's component area."""
  import torch
  m = mask.to(torch.bool).cpu().numpy()
  labels = np.zeros(m.shape, np.int32)
  counts = np.zeros(m.shape, np.int32)
  _, _, h, w = m.shape
  for n in range(m.shape[0]):
    fg, lab, cnt = m[n, 0], labels[n, 0], counts[n, 0]
    nxt = 0
    for y0 in range(h):
      for x0 in range(w):
        if not fg[y0, x0] or lab[y0, x0]:
          continue
        nxt += 1
        lab[y0, x0] = nxt
        comp, stack = [], [(y0, x0)]
        while stack:
          y, x = stack.pop()
          comp.append((y, x))
          for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
              yy, xx = y + dy, x + dx
              if 0 <= yy < h and 0 <= xx < w and fg[yy, xx] and not lab[yy, xx]:
                lab[yy, xx] = nxt
                stack.append((yy, xx))
        for y, x in comp:
          cnt[y, x] = len(comp)
  return torch.from_numpy(labels), torch.from_numpy(counts)


def connected_components_scipy(mask):
  """`connected_components_bruteforce`'s result from scipy's labelling (8-connectivity): as fast as our own hole
  filling, for timing the reference without sam2's CUDA kernel. Returns tensors on the mask's device."""
  import torch
  from scipy import ndimage
  m = mask.to(torch.bool).cpu().numpy()
  labels, counts = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
  for n in range(m.shape[0]):
    lab, k = ndimage.label(m[n, 0], structure=np.ones((3, 3), bool))
    labels[n, 0] = lab
    counts[n, 0] = np.where(lab > 0, np.bincount(lab.ravel(), minlength=k + 1)[lab], 0)
  return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def write_video_frames(directory: str, frames: int, h: int, w: int, seed: int = 1) -> list[str]:
  """`frames` JPEGs `00000.jpg`, ... (quality 95) of a smooth random scene panning 4 pixels per frame, as SAM-2's
  frame loader expects them. Returns their paths."""
  import os
  from PIL import Image
  from evf_testing.images import smooth_image
  base = smooth_image(h + 4 * frames, w + 4 * frames, seed=seed)
  paths = []
  for t in range(frames):
    paths.append(os.path.join(directory, f"{t:05d}.jpg"))
    Image.fromarray(base[4 * t:4 * t + h, 4 * t:4 * t + w]).save(paths[-1], quality=95)
  return paths


def reference_video(predictor, frames_dir: str, prompt_embedding,
                    components=connected_components_bruteforce) -> tuple[list[np.ndarray], list[float]]:
  """EVF-SAM2's video flow on sam2's legacy video predictor: the frames of `frames_dir` (`<int>.jpg`) loaded by
  its own loader, one object prompted on frame 0 by `prompt_embedding` (1, C) alone (EVF's `add_new_text`: the
  prompt encoder returns the text token as the only sparse prompt and `no_mask_embed` as the dense one; here a
  placeholder point goes through `add_new_points_or_box` and the prompt encoder is patched for that one call),
  then `propagate_in_video`. Hole filling runs with `components` (default `connected_components_bruteforce`) in
  place of the CUDA kernel. Returns the video-resolution logits (H, W) per frame and the object-score logits."""
  import torch
  from sam2.utils import misc
  pe = predictor.sam_prompt_encoder
  text = torch.from_numpy(np.asarray(prompt_embedding, np.float32)).reshape(1, 1, -1).to(predictor.device)
  h, w = pe.image_embedding_size

  def text_prompt(points=None, boxes=None, masks=None):
    return text, pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)

  cc, misc.get_connected_components = misc.get_connected_components, components
  try:
    with torch.inference_mode():
      state = predictor.init_state(frames_dir)
      pe.forward = text_prompt
      try:
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[0.0, 0.0]], labels=[1])
      finally:
        del pe.forward
      logits, scores = [], []
      for t, _, video_res in predictor.propagate_in_video(state):
        assert t == len(logits)
        logits.append(video_res[0, 0].float().numpy())
        out = state["output_dict"]["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t]
        scores.append(float(out["object_score_logits"][0, 0]))
  finally:
    misc.get_connected_components = cc
  return logits, scores
