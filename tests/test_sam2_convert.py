"""SAM-2 config presets against the original's yaml configs, and the SAM-2 conversion table: coverage of every
tensor of the released sizes (video memory included), strict errors (SAM 2.1's extra tensors refused), the
EVF-SAM2 `visual_model.` prefix and renamed `gamma`, and an exact round trip."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from flax import traverse_util

from convert.rules import ConversionError, revert
from convert.sam2 import (
  convert_sam2,
  convert_sam2_result,
  infer_sam2_size,
)
from evf_jax.sam2 import SAM2_CONFIGS, Sam2Config, abstract_params
from evf_testing import torch_reference as tr
from evf_testing.sam2_reference import build_torch_sam2, compose_config

TOY = SAM2_CONFIGS["toy"]
RELEASED = ["hiera_t", "hiera_s", "hiera_b+", "hiera_l"]

# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", RELEASED)
def test_presets_match_the_yaml(name):
  """Every field our preset shares with `configs/sam2/sam2_hiera_*.yaml` (SAM 2.0) as `build_sam2` resolves it,
  the Hiera constructor's defaults standing in for what the yaml leaves out."""
  cfg, model = SAM2_CONFIGS[name], compose_config(SAM2_CONFIGS[name]).model  # skips without sam2
  from sam2.modeling.backbones.hieradet import Hiera
  trunk_defaults = {k: p.default for k, p in inspect.signature(Hiera.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
  trunk = {**trunk_defaults, **model.image_encoder.trunk}
  for field in ("embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec",
                "window_pos_embed_bkg_spatial_size", "q_pool", "q_stride", "dim_mul", "head_mul"):
    assert tuple(np.atleast_1d(getattr(cfg, field))) == tuple(np.atleast_1d(trunk[field])), field
  neck = model.image_encoder.neck
  assert (cfg.d_model, cfg.channel_list, cfg.fpn_top_down_levels, cfg.fpn_interp_model, cfg.scalp) == (
      neck.d_model, tuple(neck.backbone_channel_list), tuple(neck.fpn_top_down_levels), neck.fpn_interp_model,
      model.image_encoder.scalp)
  assert neck.position_encoding.num_pos_feats == cfg.d_model
  for field in ("image_size", "use_high_res_features_in_sam", "iou_prediction_use_sigmoid", "pred_obj_scores",
                "pred_obj_scores_mlp", "use_multimask_token_for_obj_ptr", "directly_add_no_mem_embed"):
    assert getattr(cfg, field) == model[field], field
  for field, value in model.sam_mask_decoder_extra_args.items():
    assert getattr(cfg, field) == value, field
  assert cfg.embedding_size == model.image_size // 16 == 64
  _assert_memory_fields(cfg, model)


def _assert_memory_fields(cfg, model):
  ma, me = model.memory_attention, model.memory_encoder
  assert (cfg.d_model, cfg.memory_attention_layers, cfg.memory_attention_mlp_dim) == (
      ma.d_model, ma.num_layers, ma.layer.dim_feedforward)
  for att in (ma.layer.self_attention, ma.layer.cross_attention):
    assert (att.embedding_dim, att.num_heads, att.rope_theta) == (cfg.d_model, cfg.memory_attention_heads,
                                                                  cfg.rope_theta)
  assert ma.layer.cross_attention.kv_in_dim == me.out_dim == me.position_encoding.num_pos_feats == cfg.mem_dim
  assert me.fuser.layer.dim == cfg.d_model and me.fuser.num_layers == cfg.fuser_layers
  assert (ma.layer.activation, ma.pos_enc_at_input, ma.layer.pos_enc_at_attn, ma.layer.pos_enc_at_cross_attn_keys,
          ma.layer.pos_enc_at_cross_attn_queries) == ("relu", True, False, True, False)
  for field in ("num_maskmem", "sigmoid_scale_for_mem_enc", "sigmoid_bias_for_mem_enc"):
    assert getattr(cfg, field) == model[field], field
  # The SAM 2.0 flow our tracker implements (what EVF-SAM2's bundled configs say).
  assert (model.use_obj_ptrs_in_encoder, model.add_tpos_enc_to_obj_ptrs, model.fixed_no_obj_ptr,
          model.multimask_output_for_tracking, model.use_mlp_for_obj_ptr_proj, model.directly_add_no_mem_embed,
          model.only_obj_ptrs_in_the_past_for_eval) == (True, False, True, True, True, True, True)
  assert model.get("max_obj_ptrs_in_encoder", 16) == cfg.max_obj_ptrs_in_encoder
  assert model.get("no_obj_embed_spatial", False) is False


def test_toy_memory_overrides_reach_the_reference():
  cfg = SAM2_CONFIGS["toy"]
  model = compose_config(cfg).model
  _assert_memory_fields(cfg, model)


@pytest.mark.parametrize("name", sorted(SAM2_CONFIGS))
def test_config_json_round_trip(name):
  c = SAM2_CONFIGS[name]
  back = Sam2Config.from_dict(json.loads(json.dumps(c.to_dict())))
  assert back == c and hash(back) == hash(c)
  assert Sam2Config.preset(name) is c


def test_block_specs_of_hiera_l():
  """Hiera-L's window lags a block behind its stage, q-pools at 2, 8, 44 and attends globally at 23, 33, 43."""
  specs = SAM2_CONFIGS["hiera_l"].block_specs()
  windows = [s.window_size for s in specs]
  assert windows[:3] == [8, 8, 8] and windows[3:9] == [4] * 6 and windows[44:] == [16, 8, 8, 8]
  assert [i for i, w in enumerate(windows) if w == 0] == [23, 33, 43]
  assert set(windows[9:44]) == {0, 16}
  assert [i for i, s in enumerate(specs) if s.q_pool] == [2, 8, 44]
  assert [(s.dim, s.dim_out, s.num_heads) for s in (specs[2], specs[8], specs[44])] == [
      (144, 288, 4), (288, 576, 8), (576, 1152, 16)]
  assert {s.dim_out // s.num_heads for s in specs} == {72}


def test_config_errors():
  with pytest.raises(ValueError, match="unknown SAM-2 size"):
    Sam2Config.preset("hiera_xl")
  with pytest.raises(ValueError, match="unknown Sam2Config fields"):
    Sam2Config.from_dict({"embed": 3})
  with pytest.raises(ValueError, match="outside depth"):
    Sam2Config(stages=(1, 1, 1, 1), global_att_blocks=(4,))
  with pytest.raises(ValueError, match="not a multiple of window_spec"):
    Sam2Config(image_size=96, window_spec=(16, 4, 14, 7))


# ------------------------------------------------------------------------- rules vs released sizes

def _torch_shapes(cfg) -> dict[str, tuple[int, ...]]:
  # Hiera's constructor reads values off a tensor (`.item()`), so it cannot be built on the meta device.
  return {k: tuple(v.shape) for k, v in build_torch_sam2(cfg, seed=None).state_dict().items()}


@pytest.mark.parametrize("name", ["toy", "hiera_t", *[pytest.param(n, marks=pytest.mark.slow)
                                                       for n in ("hiera_s", "hiera_b+", "hiera_l")]])
def test_rules_cover_every_tensor_of_each_size(name):
  """The reference SAM2Base's state dict (zeros: only names and shapes matter) converts: the strict engine
  raises on any unmatched key, double match, shape mismatch or unfilled parameter. Nothing is skipped: the
  video memory converts too."""
  cfg = SAM2_CONFIGS[name]
  shapes = _torch_shapes(cfg)
  res = convert_sam2_result({k: np.broadcast_to(np.float16(0), s) for k, s in shapes.items()}, cfg, dtype=np.float16)
  assert len(res.mapping) == len(traverse_util.flatten_dict(abstract_params(cfg)))
  assert {src for src, _ in res.mapping.values()} == set(shapes)
  if name == "hiera_l":  # the count of the released Hiera-L (2.0) checkpoint
    assert len(shapes) == 900


def test_infer_sam2_size():
  def arrays(cfg):  # zero-stride views: no memory
    return {k: np.broadcast_to(np.float32(0), s) for k, s in _torch_shapes(cfg).items()}
  shapes = arrays(SAM2_CONFIGS["hiera_t"])
  assert infer_sam2_size(shapes) == "hiera_t"
  assert infer_sam2_size({"visual_model." + k: v for k, v in shapes.items()}, prefix="visual_model.") == "hiera_t"
  with pytest.raises(ConversionError, match="width 16 and depth 8"):
    infer_sam2_size(arrays(TOY))
  with pytest.raises(ConversionError, match="not a SAM-2 state dict"):
    infer_sam2_size({"image_encoder.blocks.0.attn.qkv.weight": np.zeros(1)})


# ----------------------------------------------------------------------------- strict conversion

@pytest.fixture(scope="module")
def toy_sd():
  return tr.state_dict_numpy(build_torch_sam2(TOY, seed=2))


def test_round_trip_is_exact(toy_sd):
  res = convert_sam2_result(toy_sd, TOY)
  back = revert(res.params, res.mapping)
  assert set(back) == set(toy_sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, toy_sd[k], err_msg=k)
  assert res.mapping["image_encoder/trunk/blocks_0/mlp/lin2/kernel"] == (
      "image_encoder.trunk.blocks.0.mlp.layers.1.weight", "linear")
  assert res.mapping["image_encoder/neck/convs_0/kernel"] == ("image_encoder.neck.convs.0.conv.weight", "conv2d")
  assert res.mapping["sam_mask_decoder/output_upscaling_3/kernel"] == (
      "sam_mask_decoder.output_upscaling.3.weight", "conv_transpose2d")
  assert res.mapping["memory_encoder/fuser/layers_1/gamma"] == ("memory_encoder.fuser.layers.1.gamma", "identity")
  assert res.mapping["memory_encoder/fuser/layers_0/dwconv/kernel"][1] == "conv2d"
  assert res.mapping["memory_attention/layers_1/cross_attn_image/k_proj/kernel"] == (
      "memory_attention.layers.1.cross_attn_image.k_proj.weight", "linear")


def test_evf_prefix_and_other_keys(toy_sd):
  """EVF-SAM2 keeps SAM-2 under `visual_model.` beside BEiT-3 (`mm_extractor.*`) and renames the fuser's `gamma`
  to `weight`: read under either name, refused under both."""
  sd = {"visual_model." + k.replace(".gamma", ".weight"): v for k, v in toy_sd.items()}
  assert "visual_model.memory_encoder.fuser.layers.0.weight" in sd
  sd["mm_extractor.beit3.some.weight"] = np.zeros(3, np.float32)
  params = convert_sam2(sd, TOY, prefix="visual_model.")
  direct = convert_sam2(toy_sd, TOY)
  flat_a, flat_b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(direct)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  with pytest.raises(ConversionError, match="no keys start with the prefix"):
    convert_sam2(toy_sd, TOY, prefix="visual_model.")
  both = {**toy_sd, "memory_encoder.fuser.layers.0.weight": toy_sd["memory_encoder.fuser.layers.0.gamma"]}
  with pytest.raises(ConversionError, match="filled twice"):
    convert_sam2(both, TOY)


def test_sam21_tensors_are_refused(toy_sd):
  """SAM 2.1's extra tensors mean a different video flow (object-pointer temporal encodings, a no-object spatial
  embedding): an error, not a silent 2.0 run."""
  sd = {**toy_sd, "no_obj_embed_spatial": np.zeros((1, 16), np.float32),
        "obj_ptr_tpos_proj.weight": np.zeros((16, 32), np.float32)}
  with pytest.raises(ConversionError) as e:
    convert_sam2(sd, TOY)
  assert str(e.value) == ("cannot convert SAM-2 toy weights: a SAM 2.1 checkpoint (it holds no_obj_embed_spatial, "
                          "obj_ptr_tpos_proj.weight); only SAM 2.0 is supported, which EVF-SAM2 builds on "
                          "(sam2_hiera_*.pt, not sam2.1_hiera_*.pt)")


def test_every_problem_is_reported_at_once(toy_sd):
  sd = dict(toy_sd)
  del sd["sam_mask_decoder.obj_score_token.weight"]
  sd["image_encoder.trunk.blocks.0.attn.rel_pos_h"] = np.zeros((15, 16), np.float32)  # a SAM-1 tensor
  sd["image_encoder.neck.convs.0.conv.weight"] = np.zeros((32, 64, 1, 1), np.float32)
  with pytest.raises(ConversionError) as e:
    convert_sam2(sd, TOY)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "sam_mask_decoder/obj_score_token" in msg and "missing" in msg
  assert "unexpected source key 'image_encoder.trunk.blocks.0.attn.rel_pos_h'" in msg
  assert "shape mismatch for 'image_encoder.neck.convs.0.conv.weight'" in msg
