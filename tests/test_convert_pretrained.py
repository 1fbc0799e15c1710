"""`convert.pretrained.init_from_pretrained`: EVF-SAM params from the public SAM and BEiT-3 files.

Random-weight torch models (tiny sizes) are saved exactly as the public files are laid out: SAM as the
plain state dict of segment-anything's `Sam` (`sam_vit_*.pth`), BEiT-3 as `{"model": {"beit3.*": ...,
<pretraining heads>}}` (`beit3_*_patch16_224.pth`, see the module docstring of convert/pretrained.py).
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
from evf_jax.beit3 import Beit3Config
from evf_jax.errors import UserError
from evf_jax.evf import EvfConfig, EvfSam, abstract_params, init_params
from evf_testing import torch_reference as tr
from evf_testing.beit3_reference import PAD, make_inputs, run_torch, torch_beit3
from evf_testing.sam_reference import build_torch_sam, nchw_to_nhwc

CONFIG = EvfConfig.preset("tiny")
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


def test_tree_is_the_models(full):
  params, _ = full
  want = flatten(abstract_params(CONFIG))
  got = flatten(params)
  assert set(got) == set(want)
  for k, s in want.items():
    assert got[k].shape == s.shape and got[k].dtype == s.dtype, k


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


def test_projector_is_the_random_init(full):
  params, _ = full
  proj = _flat_np(params["projector"])
  # What init_params(config, rng) draws for the projector (test_matches_init_params checks that the
  # pruned init equals it); another key draws other values.
  want = _flat_np(P.random_subtrees(CONFIG, jax.random.key(RNG), ["projector"])["projector"])
  other = _flat_np(P.random_subtrees(CONFIG, jax.random.key(RNG + 1), ["projector"])["projector"])
  for k in proj:
    np.testing.assert_array_equal(proj[k], want[k], err_msg=k)
  k1 = "fc1/kernel"
  assert np.std(proj[k1]) > 0.01 and not np.array_equal(proj[k1], other[k1])


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
  torch = tr.import_torch()
  sd = {"visual_model." + k: v for k, v in files.sam.state_dict().items()}
  sd.update({"mm_extractor.beit3." + k: v for k, v in files.beit3.state_dict().items()})
  sd["text_hidden_fcs.0.0.weight"] = torch.zeros(4, 4)
  path = str(tmp_path / "evf.pth")
  torch.save(sd, path)
  params, report = P.init_from_pretrained(CONFIG, sam_path=path, beit3_path=path, rng=jax.random.key(RNG))
  assert report.sources["sam"].prefix == "visual_model."
  assert report.sources["beit3"].prefix == "mm_extractor.beit3."
  assert "text_hidden_fcs.0.0.weight" in report.sources["sam"].skipped
  assert "visual_model.mask_decoder.iou_token.weight" in report.sources["beit3"].skipped
  for name in ("sam", "beit3"):
    ref = flatten(full[0][name])
    for k, v in _flat_np(params[name]).items():
      np.testing.assert_array_equal(v, np.asarray(ref[k]), err_msg=k)


def _one_line_error(match, **kw):
  with pytest.raises(P.CheckpointSizeError) as e:
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
  params, _ = full
  ref = init_params(CONFIG, jax.random.key(RNG))
  for k, v in _flat_np(params["projector"]).items():
    np.testing.assert_array_equal(v, np.asarray(flatten(ref["projector"])[k]), err_msg=k)
