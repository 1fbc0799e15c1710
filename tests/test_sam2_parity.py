"""Numerical parity of the Flax SAM-2 image path with PyPI sam2 1.1.0 (PyTorch), through the real converter.

Every model test builds the reference `SAM2Base` (hydra config, as `build_sam2`) with seeded random weights
(LayerNorms, tokens and position tables included), saves its state dict as .safetensors, loads it with
`convert.io.load_state_dict` and converts it with `convert_sam2`. Float32 throughout, with
`jax_default_matmul_precision="highest"` (tests/conftest.py).

Tolerances are absolute, on outputs of magnitude ~1-10 (stated per comparison; measured errors print with
`pytest -s`). Summation order differs between XLA and torch, so float32 rounding (~1e-7 relative per op)
accumulates with depth: a few 1e-6 at toy size. Parameter-free pieces (max pooling, the sine encoding) are
compared on their own; the Hiera position embedding's bicubic resize is `evf_jax.beit3.preprocess`'s, tested
with BEiT-3's preprocessing.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.io import load_state_dict
from convert.sam2 import convert_sam2
from evf_jax.sam2 import SAM2_CONFIGS, Sam2
from evf_jax.sam2.hieradet import Hiera, max_pool
from evf_jax.sam2.position_encoding import sine_position_encoding
from evf_testing import torch_reference as tr
from evf_testing.sam2_reference import build_torch_sam2, sam2_package, xla_optimizations
from evf_testing.sam_reference import nchw_to_nhwc, to_np

TOY = SAM2_CONFIGS["toy"]
# Compiling, not running, is what the toy models cost: XLA with most optimizations off.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _close(ours, ref, atol, what=""):
  a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.abs(a - b).max()) if a.size else 0.0
  print(f"[parity] {what}: max abs {err:.3g} (atol {atol:g}, max |ref| {np.abs(b).max() if b.size else 0:.3g})")
  assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"
  return err


def _t(a):
  import torch
  return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


@functools.partial(jax.jit, static_argnames=("cfg", "method", "multimask_output"))
def _run(params, *args, cfg, method, multimask_output=None):
  """Jitted `Sam2(cfg).apply`."""
  kw = {} if multimask_output is None else {"multimask_output": multimask_output}
  return Sam2(cfg).apply({"params": params}, *args, method=method, **kw)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _trunk(params, x, *, cfg):
  hiera = Hiera(cfg.embed_dim, cfg.block_specs(), cfg.stage_ends, cfg.window_pos_embed_bkg_spatial_size,
                cfg.window_spec[0], cfg.q_stride, cfg.mlp_ratio)
  return hiera.apply({"params": params["image_encoder"]["trunk"]}, x)


def _converted(torch_model, cfg, directory):
  path = tr.save_safetensors(tr.state_dict_numpy(torch_model), str(directory / "model.safetensors"))
  return convert_sam2(load_state_dict(path), cfg)


def _images(cfg, b, seed, hw=None):
  h, w = hw or (cfg.image_size, cfg.image_size)
  return np.random.default_rng(seed).normal(size=(b, 3, h, w)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _features(params, x, *, cfg):
  """`forward_image` and `embed_image` in one program (one compile; XLA shares the trunk)."""
  return Sam2(cfg).apply({"params": params}, x, method=lambda m, x: (m.forward_image(x), m.embed_image(x)))


def _both_image_paths(model, params, cfg, x) -> types.SimpleNamespace:
  """The reference's `forward_image` and SAM2ImagePredictor's cached features (no_mem_embed added to the lowest
  level; (HW, B, C) back to (B, C, H, W)), and ours, for images x (B, 3, S, S)."""
  import torch
  with torch.no_grad():
    backbone = model.forward_image(_t(x))
    _, feats, _, sizes = model._prepare_backbone_features(backbone)
    feats[-1] = feats[-1] + model.no_mem_embed
    maps = [f.permute(1, 2, 0).reshape(f.shape[1], -1, *s) for f, s in zip(feats, sizes)]
  ours_backbone, (ours_embed, ours_high_res) = jax.block_until_ready(
      _features(params, jnp.asarray(nchw_to_nhwc(x)), cfg=cfg))
  return types.SimpleNamespace(cfg=cfg, model=model, params=params, x=x, backbone=backbone, image_embed=maps[-1],
                               high_res=maps[:-1], ours_backbone=ours_backbone, ours_embed=ours_embed,
                               ours_high_res=ours_high_res)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The toy reference and our converted params, with both sides' image features for one batch of 2 images."""
  model = build_torch_sam2(TOY, seed=1)
  return _both_image_paths(model, _converted(model, TOY, tmp_path_factory.mktemp("toy")), TOY, _images(TOY, 2, 0))


# --------------------------------------------------------------------------- parameter-free pieces

@pytest.mark.parametrize("h,w,feats", [(64, 64, 256), (5, 3, 32), (32, 24, 64)])
def test_sine_position_encoding(h, w, feats):
  sam2_package()
  from sam2.modeling.position_encoding import PositionEmbeddingSine
  ref = PositionEmbeddingSine(feats)(_t(np.zeros((2, 1, h, w), np.float32)))
  ours = sine_position_encoding(h, w, feats)
  assert ours.shape == (h, w, feats)
  # float32 sin/cos of arguments up to 2pi, torch's vs numpy's pow and sin: a few ulp.
  _close(ours[None], nchw_to_nhwc(to_np(ref))[:1], 1e-6, f"sine {h}x{w}x{feats}")


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (5, 4)])
def test_max_pool(h, w):
  import torch
  x = np.random.default_rng(h * w).normal(size=(2, h, w, 3)).astype(np.float32)
  ref = torch.nn.MaxPool2d(2, 2, ceil_mode=False)(_t(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(max_pool(jnp.asarray(x), (2, 2))), to_np(ref))


# ---------------------------------------------------------------------------------- image encoder

def test_toy_trunk_non_square(toy):
  """All four stage outputs (the image-encoder tests below cover the square case but not the scalped coarsest
  level). 128x96 (token grids 32x24 .. 4x3) pads windows differently along H and W (block 6 pools queries inside
  6-windows of an 8x6 grid padded to 12x6), which catches an H/W swap."""
  import torch
  x = _images(TOY, 2, seed=3, hw=(128, 96))
  with torch.no_grad():
    ref = toy.model.image_encoder.trunk(_t(x))
  ours = _trunk(toy.params, jnp.asarray(nchw_to_nhwc(x)), cfg=TOY)
  assert len(ours) == len(ref) == 4
  for i, (a, b) in enumerate(zip(ours, ref)):
    _close(a, nchw_to_nhwc(to_np(b)), 2e-5, f"trunk stage {i} {tuple(a.shape)}")


def test_toy_image_encoder(toy):
  """`forward_image`: the neck's 3 kept levels (the 2 finest through conv_s0 / conv_s1), the vision features and
  the sine position encodings (ours (1, h, w, C), the reference's repeated over the batch)."""
  ours, ref = toy.ours_backbone, toy.backbone
  assert len(ours["backbone_fpn"]) == len(ref["backbone_fpn"]) == 3
  for i, (a, b) in enumerate(zip(ours["backbone_fpn"], ref["backbone_fpn"])):
    _close(a, nchw_to_nhwc(to_np(b)), 2e-5, f"backbone_fpn[{i}] {tuple(a.shape)}")
  for i, (a, b) in enumerate(zip(ours["vision_pos_enc"], ref["vision_pos_enc"])):
    _close(np.broadcast_to(a, (2, *a.shape[1:])), nchw_to_nhwc(to_np(b)), 1e-6, f"vision_pos_enc[{i}]")
  _close(ours["vision_features"], nchw_to_nhwc(to_np(ref["vision_features"])), 2e-5, "vision_features")


def test_toy_embed_image(toy):
  """What SAM2ImagePredictor caches per image: the embedding with no_mem_embed added, and the high-res features."""
  _close(toy.ours_embed, nchw_to_nhwc(to_np(toy.image_embed)), 2e-5, "image_embed")
  assert len(toy.ours_high_res) == 2
  for i, (a, b) in enumerate(zip(toy.ours_high_res, toy.high_res)):
    _close(a, nchw_to_nhwc(to_np(b)), 2e-5, f"high_res_feats[{i}]")


# ------------------------------------------------------------------------------------- SAM heads

def _prompts(cfg, b, seed):
  """Points with every label SAM-2 knows (-1 pad, 0, 1, 2 / 3 box corners), boxes, low-res mask logits."""
  rng = np.random.default_rng(seed)
  s, lr = cfg.image_size, cfg.low_res_size
  coords = rng.uniform(0, s, size=(b, 5, 2)).astype(np.float32)
  labels = np.tile(np.array([1, 0, 2, 3, -1], np.int32), (b, 1))
  labels[1:, 1] = rng.choice([-1, 0, 1, 2, 3], size=b - 1)
  xy0 = rng.uniform(0, s / 2, size=(b, 2))
  boxes = np.concatenate([xy0, xy0 + rng.uniform(1, s / 2, size=(b, 2))], 1).astype(np.float32)
  masks = (3 * rng.normal(size=(b, 1, lr, lr))).astype(np.float32)
  return (coords, labels), boxes, masks


COMBOS = {"points": ("points",), "boxes": ("boxes",), "masks": ("masks",), "points+boxes": ("points", "boxes"),
          "all": ("points", "boxes", "masks"), "none": ()}


def _select(combo, points, boxes, masks):
  return (points if "points" in combo else None, boxes if "boxes" in combo else None,
          masks if "masks" in combo else None)


def _torch_prompts(model, points, boxes, masks):
  import torch
  with torch.no_grad():
    return model.sam_prompt_encoder(points=None if points is None else (_t(points[0]), _t(points[1])),
                                    boxes=_t(boxes), masks=_t(masks))


@pytest.mark.parametrize("combo", list(COMBOS))
def test_toy_prompt_encoder(toy, combo):
  p, b, m = _select(COMBOS[combo], *_prompts(TOY, 3, seed=4))
  sp_ref, de_ref = _torch_prompts(toy.model, p, b, m)
  sp, de = _run(toy.params, p, b, m, cfg=TOY, method=Sam2.encode_prompts)
  _close(sp, to_np(sp_ref), 1e-5, f"sparse ({combo})")
  _close(de, nchw_to_nhwc(to_np(de_ref)), 1e-5, f"dense ({combo})")


def test_toy_dense_pe(toy):
  pe = _run(toy.params, cfg=TOY, method=Sam2.get_dense_pe)
  _close(pe, nchw_to_nhwc(to_np(toy.model.sam_prompt_encoder.get_dense_pe())), 1e-5, "dense pe")


def _torch_decode(model, embed, sparse, dense, multimask, high_res, repeat_image=True):
  import torch
  with torch.no_grad():
    out = model.sam_mask_decoder(image_embeddings=embed, image_pe=model.sam_prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask, repeat_image=repeat_image, high_res_features=high_res)
  return [to_np(o) for o in out]


def _compare_decoder(ours, ref, what, atol=2e-5):
  for name, a, b in zip(("mask logits", "iou", "sam tokens", "object score"), ours, ref):
    _close(a, b, atol, f"{what}: {name}")


@pytest.mark.parametrize("combo,multimask", [("points", True), ("all", False), ("none", True)])
def test_toy_mask_decoder(toy, combo, multimask):
  """The decoder on the reference's own image features of image 0 (isolating the decoder), shared by 3 prompts.
  Single-mask output goes through the dynamic-multimask fallback (`build_sam2`'s postprocessing). Each case is
  a compile: points (padded), points + box + mask, and nothing at all."""
  p, b, m = _select(COMBOS[combo], *_prompts(TOY, 3, seed=5))
  embed, high_res = toy.image_embed[:1], [f[:1] for f in toy.high_res]
  ref = _torch_decode(toy.model, embed, *_torch_prompts(toy.model, p, b, m), multimask, high_res)
  ours = _run(toy.params, jnp.asarray(nchw_to_nhwc(to_np(embed))), tuple(jnp.asarray(nchw_to_nhwc(to_np(f)))
                                                                        for f in high_res),
              p, b, m, multimask_output=multimask, cfg=TOY, method=Sam2.decode)
  n = 1 if combo == "none" else 3
  assert ours[0].shape == (n, 3 if multimask else 1, TOY.low_res_size, TOY.low_res_size)
  assert ours[2].shape == (n, 3 if multimask else 1, TOY.d_model) and ours[3].shape == (n, 1)
  _compare_decoder(ours, ref, f"{combo}, multimask={multimask}")


def test_toy_dynamic_multimask_takes_both_branches(toy):
  """The single-mask fallback keeps mask 0 where it is stable and takes the best of masks 1-3 elsewhere. With
  random weights mask 0 is rarely 98% stable, so the threshold is set between the prompts' stability scores."""
  import torch

  from evf_jax.sam2.mask_decoder import stability_scores
  p, _, _ = _prompts(TOY, 6, seed=6)
  embed, high_res = toy.image_embed[:1], [f[:1] for f in toy.high_res]
  sparse, dense = _torch_prompts(toy.model, p, None, None)
  decoder = toy.model.sam_mask_decoder
  with torch.no_grad():
    all_masks, _, _, _ = decoder.predict_masks(embed, toy.model.sam_prompt_encoder.get_dense_pe(), sparse,
                                                     dense, repeat_image=True, high_res_features=high_res)
  scores = to_np(decoder._get_stability_scores(all_masks[:, 0:1]))[:, 0]
  np.testing.assert_allclose(np.asarray(stability_scores(jnp.asarray(to_np(all_masks[:, 0:1])), 0.05))[:, 0],
                             scores, rtol=0, atol=0)
  thresh = float(np.median(scores))
  stable = scores >= thresh
  assert stable.any() and not stable.all(), scores
  cfg = dataclasses.replace(TOY, dynamic_multimask_stability_thresh=thresh)
  saved = decoder.dynamic_multimask_stability_thresh
  decoder.dynamic_multimask_stability_thresh = thresh
  try:
    ref = _torch_decode(toy.model, embed, sparse, dense, False, high_res)
  finally:
    decoder.dynamic_multimask_stability_thresh = saved
  ours = _run(toy.params, jnp.asarray(nchw_to_nhwc(to_np(embed))),
              tuple(jnp.asarray(nchw_to_nhwc(to_np(f))) for f in high_res), p,
              multimask_output=False, cfg=cfg, method=Sam2.decode)
  _compare_decoder(ours, ref, "dynamic multimask")
  # Stable prompts kept mask 0; the others did not.
  mask0 = to_np(all_masks[:, 0])
  assert np.array_equal(np.all(np.isclose(np.asarray(ours[0])[:, 0], mask0, atol=1e-4), axis=(1, 2)), stable)


@pytest.mark.parametrize("multimask", [True, False])
def test_toy_forward_sam_heads(toy, multimask):
  """SAM2Base's own head path (`_forward_sam_heads`: points padded with a label -1 entry, one image per prompt)
  against our `decode` on our own image features: the image encoder's error carried through."""
  import torch
  (coords, labels), _, _ = _prompts(TOY, 2, seed=7)
  with torch.no_grad():
    out = toy.model._forward_sam_heads(
        backbone_features=toy.image_embed, point_inputs={"point_coords": _t(coords), "point_labels": _t(labels)},
        high_res_features=toy.high_res, multimask_output=multimask)
  low_res_ref, iou_ref, score_ref = to_np(out[0]), to_np(out[2]), to_np(out[6])
  lr, iou, _, score = _run(toy.params, toy.ours_embed, toy.ours_high_res, (coords, labels),
                           multimask_output=multimask, cfg=TOY, method=Sam2.decode)
  # The reference replaces the masks of prompts with object score <= 0 by NO_OBJ_SCORE (-1024); ours leaves that
  # to the caller (the image path ignores the score). Both prompts here score > 0.
  assert np.all(score_ref > 0), score_ref
  _close(lr, low_res_ref, 5e-5, f"heads multimask={multimask}: mask logits")
  _close(iou, iou_ref, 2e-5, f"heads multimask={multimask}: iou")
  _close(score, score_ref, 2e-5, f"heads multimask={multimask}: object score")


def test_toy_text_prompt(toy):
  """EVF-SAM2's prompt: the projected text feature as the only sparse token (no padding point), dense =
  no_mask_embed, one image shared by N prompts, multimask output."""
  import torch
  n = 3
  text = np.random.default_rng(8).normal(size=(n, 1, TOY.d_model)).astype(np.float32)
  sp_ref, de_ref = _torch_prompts(toy.model, None, None, None)
  sp_ref, de_ref = torch.cat([sp_ref.expand(n, -1, -1), _t(text)], 1), de_ref.expand(n, -1, -1, -1)
  embed, high_res = toy.image_embed[:1], [f[:1] for f in toy.high_res]
  ref = _torch_decode(toy.model, embed, sp_ref, de_ref, True, high_res)
  sp, _ = _run(toy.params, None, None, None, text, cfg=TOY, method=Sam2.encode_prompts)
  assert sp.shape == (n, 1, TOY.d_model)
  ours = _run(toy.params, jnp.asarray(nchw_to_nhwc(to_np(embed))),
              tuple(jnp.asarray(nchw_to_nhwc(to_np(f))) for f in high_res), None, None, None, text,
              multimask_output=True, cfg=TOY, method=Sam2.decode)
  _compare_decoder(ours, ref, "text prompt")


# ------------------------------------------------------------------------- released sizes, 1024 px

@pytest.fixture(scope="module", params=["hiera_t", "hiera_l"])
def full(request, tmp_path_factory):
  """A released size at 1024 px with random weights: Hiera-T pads its 14-windows (64 -> 70 tokens per side) and
  pools queries in padded windows; Hiera-L is EVF-SAM2's. One image through both image paths."""
  import gc
  cfg = SAM2_CONFIGS[request.param]
  model = build_torch_sam2(cfg, seed=4)
  params = _converted(model, cfg, tmp_path_factory.mktemp(request.param))
  with xla_optimizations():
    yield _both_image_paths(model, params, cfg, _images(cfg, 1, seed=9))
  del model, params
  gc.collect()


@pytest.mark.slow
def test_full_size_image_features(full):
  """48 (L) or 12 (T) blocks of float32 rounding with summation orders that differ: errors grow with depth and
  with the features' magnitude (up to ~30 with random weights). Measured: 4.8e-5 (L) and 2.2e-5 (T) at most."""
  for i, (a, b) in enumerate(zip(full.ours_backbone["backbone_fpn"], full.backbone["backbone_fpn"])):
    _close(a, nchw_to_nhwc(to_np(b)), 1e-4, f"{full.cfg.name} backbone_fpn[{i}] {tuple(a.shape)}")
  _close(full.ours_embed, nchw_to_nhwc(to_np(full.image_embed)), 1e-4, f"{full.cfg.name} image_embed")


@pytest.mark.slow
def test_full_size_heads(full):
  """The SAM heads on our own image features against the reference decoder on its own (a point prompt, padded;
  EVF-SAM2's text token), and SAM2Base's `_forward_sam_heads` (which also gates masks by the object score): the
  image encoder's error carried through."""
  import torch
  cfg, model = full.cfg, full.model
  points, _, _ = _prompts(cfg, 1, seed=10)
  text = np.random.default_rng(11).normal(size=(2, 1, cfg.d_model)).astype(np.float32)
  sp_ref, de_ref = _torch_prompts(model, None, None, None)
  for what, prompts, (sparse, dense) in [
      ("point prompt", (points,), _torch_prompts(model, points, None, None)),
      ("text prompt", (None, None, None, text), (torch.cat([sp_ref.expand(2, -1, -1), _t(text)], 1),
                                                de_ref.expand(2, -1, -1, -1)))]:
    ref = _torch_decode(model, full.image_embed, sparse, dense, True, full.high_res)
    ours = _run(full.params, full.ours_embed, full.ours_high_res, *prompts, multimask_output=True, cfg=cfg,
                method=Sam2.decode)
    _compare_decoder(ours, ref, f"{cfg.name} {what}", atol=1e-4)  # measured <= 2.6e-5 on logits up to ~16
  with torch.no_grad():
    out = model._forward_sam_heads(
        backbone_features=full.image_embed, point_inputs={"point_coords": _t(points[0]), "point_labels": _t(points[1])},
        high_res_features=full.high_res, multimask_output=True)
  lr, _, _, score = _run(full.params, full.ours_embed, full.ours_high_res, points, multimask_output=True, cfg=cfg,
                         method=Sam2.decode)
  gated = np.where(np.asarray(score)[:, :, None, None] > 0, lr, -1024.0)  # NO_OBJ_SCORE
  _close(gated, to_np(out[0]), 1e-4, f"{cfg.name} _forward_sam_heads: gated mask logits")
