"""`convert.pretrained.init_from_pretrained`: EVF-SAM params from the public SAM and BEiT-3 files, EVF-SAM2
params from the public SAM-2 and BEiT-3 files.

Random-weight torch models (tiny sizes) are saved exactly as the public files are laid out: SAM as the
plain state dict of segment-anything's `Sam` (`sam_vit_*.pth`), SAM-2 as `{"model": <state dict of the PyPI
sam2's SAM2Base>}` (`sam2_hiera_*.pt`), BEiT-3 as `{"model": {"beit3.*": ..., <pretraining heads>}}`
(`beit3_*_patch16_224.pth`, see the module docstring of convert/pretrained.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import pretrained as P
from convert.beit3 import convert_beit3
from convert.rules import TRANSFORMS, ConversionError, flatten
from convert.sam import convert_sam_result
from convert.sam2 import convert_sam2_result
from evf_jax import evf_sam2
from evf_jax.beit3 import Beit3Config
from evf_jax.errors import UserError
from evf_jax.evf import EvfConfig, EvfSam, abstract_params, init_params
from evf_jax.evf_sam2 import EvfSam2Config
from evf_testing import torch_reference as tr
from evf_testing.beit3_reference import PAD, make_inputs, run_torch, torch_beit3
from evf_testing.sam2_reference import build_torch_sam2
from evf_testing.sam_reference import build_torch_sam, nchw_to_nhwc

CONFIG = EvfConfig.preset("tiny")
CONFIG2 = EvfSam2Config.preset("toy")   # SAM-2 toy; BEiT-3 tiny, as CONFIG's
# SAM 2.1's yaml options over 2.0's (configs/sam2.1/sam2.1_hiera_*.yaml), which add its extra tensors.
SAM21 = ("++model.no_obj_embed_spatial=true", "++model.add_tpos_enc_to_obj_ptrs=true",
         "++model.proj_tpos_enc_in_obj_ptrs=true", "++model.use_signed_tpos_enc_to_obj_ptrs=true")
RNG = 7
PROJECTOR_PATHS = ("projector/fc1/bias", "projector/fc1/kernel", "projector/fc2/bias", "projector/fc2/kernel")


def _heads(torch, d: int, vocab: int) -> dict:
  """Stand-ins for the pretraining heads stored beside the encoder in beit3_*_patch16_224.pth: the masked
  language (vocab) and masked image (8192 visual tokens) output layers."""
  g = torch.Generator().manual_seed(5)
  return {"mlm_head.weight": torch.randn(vocab, d, generator=g), "mlm_head.bias": torch.randn(vocab, generator=g),
          "mim_head.weight": torch.randn(8192, d, generator=g), "mim_head.bias": torch.randn(8192, generator=g)}


def _save_beit3(torch, model, path, extra=None, drop=()):
  sd = {"beit3." + k: v for k, v in model.state_dict().items()}
  sd.update(extra or {})
  for k in drop:
    del sd[k]
  torch.save({"model": sd}, str(path))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  torch = tr.import_torch()
  d = tmp_path_factory.mktemp("pretrained")
  sam = build_torch_sam(CONFIG.sam, seed=1)
  beit3 = torch_beit3(CONFIG.beit3, seed=2)
  sam_path = str(d / "sam_vit_tiny.pth")
  torch.save(sam.state_dict(), sam_path)              # as segment-anything's released files
  heads = _heads(torch, CONFIG.beit3.embed_dim, CONFIG.beit3.vocab_size)
  beit3_path = _save_beit3(torch, beit3, d / "beit3_tiny_patch16_224.pth", extra=heads)
  return types.SimpleNamespace(dir=d, sam=sam, beit3=beit3, sam_path=sam_path, beit3_path=beit3_path,
                               heads=sorted(heads), sam_state=tr.state_dict_numpy(sam),
                               beit3_state=tr.state_dict_numpy(beit3))


@pytest.fixture(scope="module")
def full(files):
  return P.init_from_pretrained(CONFIG, sam_path=files.sam_path, beit3_path=files.beit3_path,
                                rng=jax.random.key(RNG))


def _flat_np(tree):
  return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _assert_equal_trees(got, want):
  got, want = _flat_np(got), _flat_np(want)
  assert got.keys() == want.keys()
  for k, v in got.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def _assert_tree_is(params, abstract):
  want, got = flatten(abstract), flatten(params)
  assert set(got) == set(want)
  for k, s in want.items():
    assert got[k].shape == s.shape and got[k].dtype == s.dtype, k


def _evf_layout(torch, sam, beit3, path) -> str:
  """An EVF-style file for both: SAM (SAM-2) under `visual_model.`, BEiT-3 under `mm_extractor.beit3.`, and a
  projector tensor that neither uses."""
  sd = {"visual_model." + k: v for k, v in sam.state_dict().items()}
  sd.update({"mm_extractor.beit3." + k: v for k, v in beit3.state_dict().items()})
  sd["text_hidden_fcs.0.0.weight"] = torch.zeros(4, 4)
  torch.save(sd, str(path))
  return str(path)


def test_tree_is_the_models(full):
  _assert_tree_is(full[0], abstract_params(CONFIG))


def test_every_sam_tensor_is_the_checkpoints(files, full):
  params, report = full
  ours = _flat_np(params["sam"])
  mapping = convert_sam_result(files.sam_state, CONFIG.sam).mapping
  assert {src for src, _ in mapping.values()} == set(files.sam_state)   # every torch tensor is used
  assert set(mapping) == set(ours)                                      # and fills every parameter
  for dest, (src, transform) in mapping.items():
    np.testing.assert_array_equal(ours[dest], TRANSFORMS[transform][0](files.sam_state[src]), err_msg=dest)
  # A few by hand, independent of the rule table.
  s = files.sam_state
  np.testing.assert_array_equal(ours["image_encoder/blocks_1/attn/qkv/kernel"],
                                s["image_encoder.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(ours["image_encoder/patch_embed/proj/kernel"],
                                s["image_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ours["mask_decoder/iou_token"], s["mask_decoder.iou_token.weight"])
  np.testing.assert_array_equal(ours["image_encoder/blocks_0/attn/rel_pos_h"],
                                s["image_encoder.blocks.0.attn.rel_pos_h"])
  assert report.sources["sam"].converted == len(files.sam_state)


def test_every_beit3_tensor_is_the_checkpoints(files, full):
  params, report = full
  ours = _flat_np(params["beit3"])
  mapping = convert_beit3(files.beit3_state, CONFIG.beit3).mapping
  assert {src for src, _ in mapping.values()} == set(files.beit3_state)
  assert set(mapping) == set(ours)
  for dest, (src, transform) in mapping.items():
    np.testing.assert_array_equal(ours[dest], TRANSFORMS[transform][0](files.beit3_state[src]), err_msg=dest)
  b = files.beit3_state
  np.testing.assert_array_equal(ours["encoder/layers_1/self_attn/q_proj/B/kernel"],
                                b["encoder.layers.1.self_attn.q_proj.B.weight"].T)
  np.testing.assert_array_equal(ours["text_embed/embedding"], b["text_embed.weight"])
  np.testing.assert_array_equal(ours["vision_embed/mask_token"], b["vision_embed.mask_token"])
  np.testing.assert_array_equal(ours["vision_embed/proj/kernel"], b["vision_embed.proj.weight"].transpose(2, 3, 1, 0))
  assert report.sources["beit3"].converted == len(files.beit3_state)


def test_report(files, full):
  _, report = full
  def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()
  sam, beit3 = report.sources["sam"], report.sources["beit3"]
  assert (sam.path, sam.sha256, sam.prefix, sam.size, sam.skipped) == (
      files.sam_path, sha(files.sam_path), "", "tiny", ())
  assert (beit3.path, beit3.sha256, beit3.prefix, beit3.size) == (
      files.beit3_path, sha(files.beit3_path), "beit3.", "tiny")
  # The pretraining heads are skipped, as the original's non-strict load skips them, and listed.
  assert list(beit3.skipped) == files.heads and list(report.skipped_keys) == files.heads
  assert report.random_subtrees == ("projector",)
  assert report.random_init == PROJECTOR_PATHS
  d = json.loads(json.dumps(report.to_dict()))
  assert d["sources"]["beit3"]["skipped"] == files.heads and d["random_init"] == list(PROJECTOR_PATHS)
  text = report.summary()
  assert "mim_head.weight" in text and "projector: random init (4 tensors)" in text


def test_projector_is_torchs_linear_init(full):
  """As the original's `text_hidden_fcs` start: torch nn.Linear's default, weights and biases uniform in
  +-1/sqrt(fan_in) (flax's lecun_normal: sqrt(3) times the spread, zero biases); another key draws other values."""
  params, _ = full
  proj = _flat_np(params["projector"])
  again = _flat_np(P.torch_linear_init(P.random_subtrees(CONFIG, jax.random.key(RNG), ["projector"])["projector"],
                                       jax.random.fold_in(jax.random.key(RNG), P.PROJECTOR_STREAM)))
  other = _flat_np(P.torch_linear_init(params["projector"], jax.random.key(RNG + 1)))
  for k, v in proj.items():
    np.testing.assert_array_equal(v, again[k], err_msg=k)
    assert not np.array_equal(v, other[k]), k
  torch = tr.import_torch()
  for layer in ("fc1", "fc2"):
    kernel, bias = proj[f"{layer}/kernel"], proj[f"{layer}/bias"]
    bound = 1 / np.sqrt(kernel.shape[0])
    ref = torch.nn.Linear(kernel.shape[0], kernel.shape[1])  # what the original draws, for the same shapes
    for ours, theirs in ((kernel, ref.weight.detach().numpy()), (bias, ref.bias.detach().numpy())):
      assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
      # The std of n uniform draws is bound/sqrt(3), give or take ~0.45/sqrt(n) of it: 4 of those allowed.
      tol = 1.8 / np.sqrt(ours.size)
      for x in (ours, theirs):
        assert abs(np.std(x) / (bound / np.sqrt(3)) - 1) < tol, (layer, x.shape, np.std(x), bound)


@pytest.mark.slow
def test_partial_init_keeps_beit3_random(files, full):
  """sam_path only: BEiT-3 stays at its random init. Slow only for compiling BEiT-3's initialisers
  (10-15 s on the shared 2 cores); the code path is the projector's, with one more subtree."""
  params, report = P.init_from_pretrained(CONFIG, sam_path=files.sam_path, beit3_path=None,
                                          rng=jax.random.key(RNG))
  full_params, _ = full
  assert set(report.sources) == {"sam"} and report.skipped_keys == ()
  assert report.random_subtrees == ("beit3", "projector")
  beit3_paths = {"beit3/" + k for k in flatten(params["beit3"])}
  assert set(report.random_init) == beit3_paths | set(PROJECTOR_PATHS)
  for k, v in _flat_np(params["sam"]).items():
    np.testing.assert_array_equal(v, np.asarray(flatten(full_params["sam"])[k]), err_msg=k)
  # The projector does not depend on which other subtrees are drawn with it.
  for k, v in _flat_np(params["projector"]).items():
    np.testing.assert_array_equal(v, np.asarray(flatten(full_params["projector"])[k]), err_msg=k)
  ours = _flat_np(params["beit3"])
  assert not np.array_equal(ours["text_embed/embedding"], files.beit3_state["text_embed.weight"])
  np.testing.assert_array_equal(ours["encoder/layer_norm/A/scale"], 1.0)   # flax's LayerNorm init
  assert all(np.isfinite(v).all() for v in ours.values())


def test_evf_sam_checkpoint_layout(files, full, tmp_path):
  """One EVF-SAM-style file for both: SAM under `visual_model.`, BEiT-3 under `mm_extractor.beit3.`."""
  path = _evf_layout(tr.import_torch(), files.sam, files.beit3, tmp_path / "evf.pth")
  params, report = P.init_from_pretrained(CONFIG, sam_path=path, beit3_path=path, rng=jax.random.key(RNG))
  assert report.sources["sam"].prefix == "visual_model."
  assert report.sources["beit3"].prefix == "mm_extractor.beit3."
  assert "text_hidden_fcs.0.0.weight" in report.sources["sam"].skipped
  assert "visual_model.mask_decoder.iou_token.weight" in report.sources["beit3"].skipped
  for name in ("sam", "beit3"):
    _assert_equal_trees(params[name], full[0][name])


def _one_line_error(match, error=P.CheckpointSizeError, **kw):
  with pytest.raises(error) as e:
    P.init_from_pretrained(rng=jax.random.key(0), **kw)
  msg = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in msg, msg
  for m in match:
    assert m in msg, msg
  return msg


def test_beit3_of_another_size(files, tmp_path):
  torch = tr.import_torch()
  other = Beit3Config(embed_dim=48, num_layers=3, num_heads=2, ffn_dim=64, img_size=32, vocab_size=100)
  path = _save_beit3(torch, torch_beit3(other, seed=3), tmp_path / "beit3_other.pth",
                     extra=_heads(torch, 48, 100))
  _one_line_error([path, "BEiT-3 (width 48, 3 layers) checkpoint given for mm_extractor_scale=tiny",
                   "needs BEiT-3 tiny (width 32, 2 layers)"],
                  config=CONFIG, sam_path=files.sam_path, beit3_path=path)


def test_sam_of_another_size(files, tmp_path):
  torch = tr.import_torch()
  other = dataclasses.replace(CONFIG.sam, name="other", embed_dim=48, depth=3, global_attn_indexes=(2,))
  path = str(tmp_path / "sam_other.pth")
  torch.save(build_torch_sam(other, seed=4).state_dict(), path)
  _one_line_error([path, "SAM (image encoder width 48, depth 3) checkpoint given for sam_scale=tiny",
                   "needs sam_tiny (image encoder width 32, depth 2)"],
                  config=CONFIG, sam_path=path, beit3_path=files.beit3_path)


def test_released_sizes_are_named(tmp_path):
  """A sam_vit_l file for sam_scale=huge, a BEiT-3 base file for large: one line naming both sizes,
  before anything is converted or initialised (the tensors here are zero-stride stand-ins: only the
  keys and shapes that give the size)."""
  torch = tr.import_torch()
  z = torch.zeros(1)
  sam = {"image_encoder.patch_embed.proj.weight": z.expand(1024, 3, 16, 16)}
  sam.update({f"image_encoder.blocks.{i}.norm1.weight": z.expand(1024) for i in range(24)})
  torch.save(sam, str(tmp_path / "sam_vit_l.pth"))
  beit3 = {"beit3.text_embed.weight": z.expand(64010, 768), "mim_head.bias": z.expand(8192)}
  beit3.update({f"beit3.encoder.layers.{i}.ffn.A.fc1.bias": z.expand(3072) for i in range(12)})
  torch.save({"model": beit3}, str(tmp_path / "beit3_base.pth"))
  config = EvfConfig.preset("evf-sam")
  _one_line_error(["sam_vit_l (image encoder width 1024, depth 24) checkpoint given for sam_scale=huge",
                   "needs sam_vit_h (image encoder width 1280, depth 32)"],
                  config=config, sam_path=str(tmp_path / "sam_vit_l.pth"), beit3_path=None)
  _one_line_error(["BEiT-3 base (width 768, 12 layers) checkpoint given for mm_extractor_scale=large",
                   "needs BEiT-3 large (width 1024, 24 layers)"],
                  config=config, sam_path=None, beit3_path=str(tmp_path / "beit3_base.pth"))


def test_missing_and_unexpected_tensors_are_listed(files, tmp_path):
  torch = tr.import_torch()
  path = _save_beit3(torch, files.beit3, tmp_path / "beit3_broken.pth",
                     extra={**_heads(torch, 32, 100), "beit3.encoder.output_projection.weight": torch.zeros(100, 32)},
                     drop=["beit3.encoder.layers.1.ffn.A.fc2.bias"])
  with pytest.raises(ConversionError) as e:
    P.init_from_pretrained(CONFIG, sam_path=files.sam_path, beit3_path=path, rng=jax.random.key(0))
  msg = str(e.value)
  assert path in msg and "2 problem(s)" in msg, msg
  assert "missing: model parameter 'encoder/layers_1/ffn/A/fc2/bias'" in msg
  assert "unexpected source key 'encoder.output_projection.weight'" in msg
  assert "mlm_head" not in msg and "mim_head" not in msg   # keys outside `beit3.` are no problem

  sd = files.sam.state_dict()
  del sd["mask_decoder.iou_token.weight"]
  sam_path = str(tmp_path / "sam_broken.pth")
  torch.save(sd, sam_path)
  with pytest.raises(ConversionError, match=r"missing: model parameter 'mask_decoder/iou_token'") as e:
    P.init_from_pretrained(CONFIG, sam_path=sam_path, beit3_path=None, rng=jax.random.key(0))
  assert sam_path in str(e.value)


def test_forward_runs_and_matches_torch(files, full):
  """The initialised model runs end to end; its SAM image embedding and BEiT-3 prompt are the torch
  modules' (the prompt through the random projector, computed here in numpy)."""
  torch = tr.import_torch()
  params, _ = full
  rng = np.random.default_rng(0)
  s = CONFIG.sam.img_size
  sam_images = rng.normal(size=(1, 3, s, s)).astype(np.float32)
  beit_images, ids = make_inputs(CONFIG.beit3, batch=2)

  def fwd(module, sam_x, beit_x, input_ids, mask):
    emb = module.embed_image(sam_x)
    prompts = module.text_prompts(beit_x, input_ids, mask)
    return (emb, prompts) + tuple(module.decode(emb, prompts))

  emb, prompts, logits, iou = jax.jit(lambda p, *x: EvfSam(CONFIG).apply({"params": p}, *x, method=fwd))(
      params, jnp.asarray(nchw_to_nhwc(sam_images)), jnp.asarray(nchw_to_nhwc(beit_images)),
      jnp.asarray(ids, jnp.int32), jnp.asarray(ids != PAD))
  assert logits.shape == (2, 1, CONFIG.sam.low_res_size, CONFIG.sam.low_res_size) and iou.shape == (2, 1)
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(iou)).all()

  with torch.no_grad():
    ref_emb = files.sam.image_encoder(torch.from_numpy(sam_images)).numpy()
  np.testing.assert_allclose(np.asarray(emb), nchw_to_nhwc(ref_emb), rtol=0, atol=1e-4)
  cls = run_torch(files.beit3, beit_images, ids)[:, 0]
  p = _flat_np(params["projector"])
  hidden = np.maximum(cls @ p["fc1/kernel"] + p["fc1/bias"], 0)
  np.testing.assert_allclose(np.asarray(prompts), hidden @ p["fc2/kernel"] + p["fc2/bias"], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_matches_init_params(full):
  """The pruned init of the random subtrees is bit-identical to `init_params` (compiles the whole
  model's initialisers: ~40 s on 2 CPU cores even at the tiny size)."""
  ref = init_params(CONFIG, jax.random.key(RNG))
  pruned = P.random_subtrees(CONFIG, jax.random.key(RNG), ["projector"])
  for k, v in _flat_np(pruned["projector"]).items():
    np.testing.assert_array_equal(v, np.asarray(flatten(ref["projector"])[k]), err_msg=k)


# ------------------------------------------------------------------------------------------ EVF-SAM2


@pytest.fixture(scope="module")
def sam2_files(files):
  torch = tr.import_torch()
  sam2 = build_torch_sam2(CONFIG2.sam2, seed=3)
  path = str(files.dir / "sam2_hiera_toy.pt")
  torch.save({"model": sam2.state_dict()}, path)      # as Meta's released files
  return types.SimpleNamespace(sam2=sam2, path=path, state=tr.state_dict_numpy(sam2))


@pytest.fixture(scope="module")
def full2(files, sam2_files):
  return P.init_from_pretrained(CONFIG2, sam_path=sam2_files.path, beit3_path=files.beit3_path,
                                rng=jax.random.key(RNG))


def test_sam2_tree_is_the_models(full2):
  _assert_tree_is(full2[0], evf_sam2.abstract_params(CONFIG2))


def test_every_sam2_tensor_is_the_checkpoints(files, sam2_files, full2):
  """The `sam` subtree is `convert.sam2`'s conversion of the file (video memory included), BEiT-3 the same
  file's conversion as for EVF-SAM, the projector torch's nn.Linear init."""
  params, report = full2
  ours = _flat_np(params["sam"])
  res = convert_sam2_result(sam2_files.state, CONFIG2.sam2)
  assert {src for src, _ in res.mapping.values()} == set(sam2_files.state)
  assert set(res.mapping) == set(ours)
  _assert_equal_trees(params["sam"], res.params)
  s = sam2_files.state
  np.testing.assert_array_equal(ours["image_encoder/trunk/blocks_1/attn/qkv/kernel"],
                                s["image_encoder.trunk.blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(ours["no_mem_embed"], s["no_mem_embed"])
  np.testing.assert_array_equal(ours["maskmem_tpos_enc"], s["maskmem_tpos_enc"])
  assert np.std(s["no_mem_embed"]) > 0.01   # seeded, not the constructor's zeros
  sam = report.sources["sam"]
  assert (sam.prefix, sam.size, sam.converted, sam.skipped) == ("", "toy", len(s), ())
  assert report.sources["beit3"].size == "tiny" and report.random_subtrees == ("projector",)
  _assert_equal_trees(params["beit3"], convert_beit3(files.beit3_state, CONFIG2.beit3).params)
  key = jax.random.key(RNG)
  _assert_equal_trees(params["projector"], P.torch_linear_init(
      P.random_subtrees(CONFIG2, key, ["projector"])["projector"], jax.random.fold_in(key, P.PROJECTOR_STREAM)))
  assert params["projector"]["fc2"]["kernel"].shape == (32, CONFIG2.out_dim)


def test_sam2_bare_state_dict(sam2_files, tmp_path):
  """The SAM2Base state dict without Meta's {"model": ...} reads as the same tensors (the rest of the path is
  the file's contents only)."""
  torch = tr.import_torch()
  path = str(tmp_path / "sam2_bare.pt")
  torch.save(sam2_files.sam2.state_dict(), path)
  bare, wrapped = P.read_checkpoint(path), P.read_checkpoint(sam2_files.path)
  assert bare.keys() == wrapped.keys() == sam2_files.state.keys()
  for k, v in bare.items():
    np.testing.assert_array_equal(v, wrapped[k], err_msg=k)


def test_evf_sam2_checkpoint_layout(files, sam2_files, full2, tmp_path):
  """One EVF-SAM2-style file for both: SAM-2 under `visual_model.`, BEiT-3 under `mm_extractor.beit3.`."""
  path = _evf_layout(tr.import_torch(), sam2_files.sam2, files.beit3, tmp_path / "evf_sam2.pth")
  params, report = P.init_from_pretrained(CONFIG2, sam_path=path, beit3_path=path, rng=jax.random.key(RNG))
  assert report.sources["sam"].prefix == "visual_model." and report.sources["sam"].size == "toy"
  assert report.sources["beit3"].prefix == "mm_extractor.beit3."
  assert "text_hidden_fcs.0.0.weight" in report.sources["sam"].skipped
  assert "visual_model.no_mem_embed" in report.sources["beit3"].skipped
  for name in ("sam", "beit3"):
    _assert_equal_trees(params[name], full2[0][name])


@pytest.mark.slow
def test_sam2_partial_init_keeps_sam_random(files, full2):
  """beit3_path only: SAM-2 stays at EVF-SAM2's random init, bit-identical to `evf_sam2.init_params` (the pruned
  init of `sam`). Slow for compiling SAM-2's initialisers, and the whole model's for the
  reference: ~2 min on 2 CPU cores."""
  params, report = P.init_from_pretrained(CONFIG2, sam_path=None, beit3_path=files.beit3_path,
                                          rng=jax.random.key(RNG))
  assert set(report.sources) == {"beit3"} and report.random_subtrees == ("sam", "projector")
  ref = evf_sam2.init_params(CONFIG2, jax.random.key(RNG))
  _assert_equal_trees(params["sam"], ref["sam"])
  _assert_equal_trees(params["beit3"], full2[0]["beit3"])
  _assert_equal_trees(params["projector"], full2[0]["projector"])  # whatever else is drawn with it


def test_sam_generation_must_be_the_configs(files, sam2_files):
  """A SAM-1 file for EVF-SAM2, and a SAM-2 file for EVF-SAM: one line saying which is which."""
  _one_line_error([files.sam_path, "a SAM checkpoint (segment-anything's sam_vit_*.pth) given for EVF-SAM2, "
                   "which needs SAM-2 (Meta's sam2_hiera_*.pt)"], error=P.CheckpointKindError,
                  config=CONFIG2, sam_path=files.sam_path, beit3_path=files.beit3_path)
  _one_line_error([sam2_files.path, "a SAM-2 checkpoint (Meta's sam2_hiera_*.pt) given for EVF-SAM, which needs "
                   "SAM (segment-anything's sam_vit_*.pth)"], error=P.CheckpointKindError,
                  config=CONFIG, sam_path=sam2_files.path, beit3_path=files.beit3_path)


def _hiera_stand_in(torch, path, width: int, depth: int, extra=()):
  """Only the keys and shapes that give a SAM-2 file's size (zero-stride tensors), as {"model": ...}."""
  z = torch.zeros(1)
  sd = {"image_encoder.trunk.patch_embed.proj.weight": z.expand(width, 3, 7, 7)}
  sd.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": z.expand(width) for i in range(depth)})
  sd.update({k: z for k in extra})
  torch.save({"model": sd}, str(path))
  return str(path)


def test_sam2_of_another_size(tmp_path):
  """Hiera-T for sam_scale=large (Hiera-L), Hiera-S for tiny (the same width, deeper), Hiera-L for the toy
  config: one line naming both, before anything is converted or initialised."""
  torch = tr.import_torch()
  _one_line_error(["sam2_hiera_t (Hiera trunk width 96, depth 12) checkpoint given for sam_scale=large",
                   "needs sam2_hiera_l (Hiera trunk width 144, depth 48)"],
                  config=EvfSam2Config.preset("evf-sam2"), beit3_path=None,
                  sam_path=_hiera_stand_in(torch, tmp_path / "sam2_hiera_tiny.pt", 96, 12))
  _one_line_error(["sam2_hiera_s (Hiera trunk width 96, depth 16) checkpoint given for sam_scale=tiny",
                   "needs sam2_hiera_t (Hiera trunk width 96, depth 12)"],
                  config=EvfSam2Config.from_scales("tiny", "tiny"), beit3_path=None,
                  sam_path=_hiera_stand_in(torch, tmp_path / "sam2_hiera_small.pt", 96, 16))
  _one_line_error(["sam2_hiera_l (Hiera trunk width 144, depth 48) checkpoint given for sam_scale=toy",
                   "needs sam2_toy (Hiera trunk width 16, depth 8)"],
                  config=CONFIG2, beit3_path=None,
                  sam_path=_hiera_stand_in(torch, tmp_path / "sam2_hiera_large.pt", 144, 48))


def test_sam21_is_refused(tmp_path):
  """A SAM 2.1 file (the PyPI sam2 built with 2.1's options: `no_obj_embed_spatial`, `obj_ptr_tpos_proj`):
  one line, before its size is checked."""
  torch = tr.import_torch()
  path = str(tmp_path / "sam2.1_hiera_toy.pt")
  torch.save({"model": build_torch_sam2(CONFIG2.sam2, seed=4, extra_overrides=SAM21).state_dict()}, path)
  msg = _one_line_error([path, "a SAM 2.1 checkpoint (it holds no_obj_embed_spatial, obj_ptr_tpos_proj.bias, "
                         "obj_ptr_tpos_proj.weight); only SAM 2.0 is supported"], error=ConversionError,
                        config=CONFIG2, sam_path=path, beit3_path=None)
  assert "problem(s)" not in msg
  large = _hiera_stand_in(torch, tmp_path / "sam2.1_hiera_large.pt", 144, 48, extra=["no_obj_embed_spatial"])
  _one_line_error(["a SAM 2.1 checkpoint (it holds no_obj_embed_spatial)"], error=ConversionError,
                  config=CONFIG2, sam_path=large, beit3_path=None)
