"""SAM config presets and the SAM conversion table: coverage of every released size, strict errors,
the EVF-SAM `visual_model.` prefix, round trip, and (slow) a full-size ViT-H against the reference."""

from __future__ import annotations

import gc
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from convert.io import CheckpointReadError, load_state_dict
from convert.rules import TRANSFORMS, ConversionError, revert
from convert.sam import convert_sam, convert_sam_result, infer_sam_size, sam_rules
from evf_jax.sam import SAM_CONFIGS, Sam, SamConfig, abstract_params
from evf_testing import torch_reference as tr
from evf_testing.sam_reference import build_torch_sam, nchw_to_nhwc, to_np

TINY = SAM_CONFIGS["tiny"]


# ------------------------------------------------------------------------------------------- config

def test_config_presets():
  assert set(SAM_CONFIGS) == {"tiny", "vit_b", "vit_l", "vit_h"}
  for name, (embed, depth, heads, glob) in {"vit_b": (768, 12, 12, (2, 5, 8, 11)),
                                            "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
                                            "vit_h": (1280, 32, 16, (7, 15, 23, 31))}.items():
    c = SAM_CONFIGS[name]
    assert (c.name, c.embed_dim, c.depth, c.num_heads, c.global_attn_indexes) == (name, embed, depth, heads, glob)
    assert (c.img_size, c.patch_size, c.window_size, c.prompt_embed_dim, c.low_res_size) == (1024, 16, 14, 256, 256)
  # tiny: the 6x6 grid is not a multiple of the window, so windowed blocks pad.
  assert TINY.embedding_size % TINY.window_size != 0


@pytest.mark.parametrize("name", sorted(SAM_CONFIGS))
def test_config_json_round_trip(name):
  c = SAM_CONFIGS[name]
  back = SamConfig.from_dict(json.loads(json.dumps(c.to_dict())))
  assert back == c and hash(back) == hash(c)
  assert SamConfig.preset(name) is c


def test_config_errors():
  with pytest.raises(ValueError, match="unknown SAM size"):
    SamConfig.preset("vit_x")
  with pytest.raises(ValueError, match="unknown SamConfig fields"):
    SamConfig.from_dict({"embed": 3})
  with pytest.raises(ValueError, match="outside depth"):
    SamConfig(depth=4, global_attn_indexes=(5,))


# ------------------------------------------------------------------------- rules vs released sizes

def _torch_shapes(cfg) -> dict[str, tuple[int, ...]]:
  import torch
  with torch.device("meta"):  # shapes only, no memory
    sam = build_torch_sam(cfg, seed=None)
  return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "tiny"])
def test_rules_cover_every_tensor_of_each_size(name):
  """Every tensor of the reference matches exactly one rule, lands on a model parameter of the right shape
  after its transform, and every parameter is filled. Shape-level, so ViT-H costs no memory."""
  cfg = SAM_CONFIGS[name]
  shapes = _torch_shapes(cfg)
  target = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params(cfg), sep="/").items()}
  compiled = [(re.compile(r.pattern), r) for r in sam_rules()]
  filled = {}
  for key, shape in shapes.items():
    hits = [(m, r) for rx, r in compiled if (m := rx.fullmatch(key))]
    assert len(hits) == 1, (key, [r.pattern for _, r in hits])
    m, rule = hits[0]
    dest = m.expand(rule.target)
    view = np.broadcast_to(np.float32(0), shape)  # a zero-stride view: transposes cost nothing
    assert TRANSFORMS[rule.transform][0](view).shape == target[dest], (key, dest)
    assert dest not in filled
    filled[dest] = key
  assert set(filled) == set(target)


def test_infer_sam_size():
  for name in ("vit_b", "vit_l", "vit_h"):
    shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in _torch_shapes(SAM_CONFIGS[name]).items()}
    assert infer_sam_size(shapes) == name
    assert infer_sam_size({"visual_model." + k: v for k, v in shapes.items()}, prefix="visual_model.") == name
  with pytest.raises(ConversionError, match="width 32 and depth 2"):
    infer_sam_size({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in _torch_shapes(TINY).items()})
  with pytest.raises(ConversionError, match="not a SAM state dict"):
    infer_sam_size({"foo": np.zeros(1)})


# ----------------------------------------------------------------------------- strict conversion

@pytest.fixture(scope="module")
def tiny_sd():
  return tr.state_dict_numpy(build_torch_sam(TINY, seed=2))


def test_round_trip_is_exact(tiny_sd):
  res = convert_sam_result(tiny_sd, TINY)
  assert len(res.mapping) == len(tiny_sd)
  back = revert(res.params, res.mapping)
  assert set(back) == set(tiny_sd)
  for k, v in tiny_sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # Transposed-conv weights took the conv_transpose2d path.
  assert res.mapping["mask_decoder/output_upscaling_0/kernel"] == ("mask_decoder.output_upscaling.0.weight",
                                                                    "conv_transpose2d")


def test_missing_key(tiny_sd):
  sd = dict(tiny_sd)
  del sd["mask_decoder.iou_token.weight"]
  with pytest.raises(ConversionError) as e:
    convert_sam(sd, TINY)
  msg = str(e.value)
  assert "SAM tiny" in msg and len(e.value.problems) == 1
  assert "'mask_decoder/iou_token'" in msg and "not filled" in msg


def test_extra_keys(tiny_sd):
  sd = dict(tiny_sd)
  sd["image_encoder.blocks.2.norm1.weight"] = np.ones(32, np.float32)  # a block beyond tiny's depth
  sd["image_encoder.head.weight"] = np.ones((2, 2), np.float32)       # no rule at all
  with pytest.raises(ConversionError) as e:
    convert_sam(sd, TINY)
  msg = str(e.value)
  assert "2 problem(s)" in msg
  assert "'image_encoder.blocks.2.norm1.weight'" in msg and "'image_encoder/blocks_2/norm1/scale'" in msg
  assert "'image_encoder.head.weight'" in msg and "no rule matches" in msg


def test_wrong_shape(tiny_sd):
  sd = dict(tiny_sd)
  sd["image_encoder.blocks.1.attn.rel_pos_h"] = np.zeros((13, 16), np.float32)  # model expects (11, 16)
  with pytest.raises(ConversionError) as e:
    convert_sam(sd, TINY)
  msg = str(e.value)
  assert len(e.value.problems) == 1  # the unfilled target is not listed again
  assert "'image_encoder.blocks.1.attn.rel_pos_h'" in msg and "(13, 16)" in msg and "(11, 16)" in msg


def test_wrong_size_lists_everything_at_once(tiny_sd):
  """Weights of the wrong size: one error, with every problem (shapes and missing blocks)."""
  with pytest.raises(ConversionError) as e:
    convert_sam(tiny_sd, SAM_CONFIGS["vit_b"])
  msg = str(e.value)
  assert "shape mismatch" in msg and "missing: model parameter 'image_encoder/blocks_11/" in msg


def test_visual_model_prefix(tiny_sd):
  sd = {"visual_model." + k: v for k, v in tiny_sd.items()}
  sd["mm_extractor.beit3.text_embed.weight"] = np.zeros((4, 3), np.float32)  # the rest of an EVF checkpoint
  sd["text_hidden_fcs.0.0.weight"] = np.zeros((3, 3), np.float32)
  ours = convert_sam(sd, TINY, prefix="visual_model.")
  plain = convert_sam(tiny_sd, TINY)
  jax.tree.map(np.testing.assert_array_equal, ours, plain)
  with pytest.raises(ConversionError, match="no rule matches"):  # without the prefix nothing matches
    convert_sam(sd, TINY)
  with pytest.raises(ConversionError, match="no keys start with the prefix 'model.'"):
    convert_sam(sd, TINY, prefix="model.")


def test_dtypes(tiny_sd):
  half = {k: v.astype(np.float16) for k, v in tiny_sd.items()}
  up = convert_sam(half, TINY)  # released EVF files may be fp16: upcast to the params' float32
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(up))
  bf = convert_sam(tiny_sd, TINY, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))


def test_a_pth_without_torch_names_the_cpu_build(tmp_path, monkeypatch):
  """Where torch is missing (an accelerator install has none), reading a .pth says which torch to install: PyPI's
  default Linux build is the CUDA one, gigabytes for a file read."""
  path = tmp_path / "sam_vit_b_01ec64.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(CheckpointReadError, match=r"needs torch, a CPU build is enough .*download\.pytorch\.org/whl/cpu"):
    load_state_dict(str(path))


# ----------------------------------------------------------------------------------- slow: ViT-H

@pytest.mark.slow
def test_vit_h_full_size(tmp_path):
  """A full-size ViT-H state dict with random weights: saved, loaded, size inferred, converted, and the
  image embedding and masks match the reference at 1024x1024."""
  import torch
  from evf_jax.sam.transforms import preprocess
  cfg = SAM_CONFIGS["vit_h"]
  torch_sam = build_torch_sam(cfg, seed=4)
  image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
  x, _, _ = preprocess(image)
  rng = np.random.default_rng(1)
  coords = rng.uniform(0, 1000, size=(2, 2, 2)).astype(np.float32)
  labels = np.array([[1, 0], [1, 1]], np.int64)
  boxes = np.array([[100, 200, 600, 700], [10, 20, 300, 500]], np.float32)
  with torch.no_grad():
    emb_ref = torch_sam.image_encoder(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None])
    sp, de = torch_sam.prompt_encoder(points=(torch.from_numpy(coords), torch.from_numpy(labels)),
                                      boxes=torch.from_numpy(boxes), masks=None)
    lr_ref, iou_ref = torch_sam.mask_decoder(emb_ref, torch_sam.prompt_encoder.get_dense_pe(), sp, de, True)
  emb_ref, lr_ref, iou_ref = to_np(emb_ref), to_np(lr_ref), to_np(iou_ref)
  path = tr.save_safetensors(tr.state_dict_numpy(torch_sam), str(tmp_path / "sam_vit_h.safetensors"))
  del torch_sam, sp, de
  gc.collect()

  sd = load_state_dict(path)
  assert infer_sam_size(sd) == "vit_h"
  params = jax.device_put(convert_sam(sd, cfg))  # keep one copy of the 2.5 GB of weights, not three
  del sd
  gc.collect()
  emb = jax.jit(lambda p, img: Sam(cfg).apply({"params": p}, img, method=Sam.embed_image))(params, x[None])
  err_emb = float(np.abs(np.asarray(emb) - nchw_to_nhwc(emb_ref)).max())
  # Our embedding into our decoder: the end-to-end chain.
  lr, iou = jax.jit(lambda p, e, pts, b: Sam(cfg).apply({"params": p}, e, pts, b, multimask_output=True,
                                                        method=Sam.decode))(params, emb, (coords, labels), boxes)
  err_lr = float(np.abs(np.asarray(lr) - lr_ref).max())
  err_iou = float(np.abs(np.asarray(iou) - iou_ref).max())
  print(f"[parity] ViT-H embedding {err_emb:.3g}, low-res logits {err_lr:.3g}, iou {err_iou:.3g}")
  # 32 blocks of float32 with different summation orders: ~2x ViT-B's error (1.7e-5).
  assert err_emb <= 1e-4 and err_lr <= 1e-4 and err_iou <= 1e-4
