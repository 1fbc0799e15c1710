"""BEiT-3 conversion (prefixes, strictness, round trip, size inference) and model/config unit checks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from flax import traverse_util

from convert import io as ckpt_io
from convert import rules as R
from convert.beit3 import convert_beit3, detect_prefix, infer_beit3_size
from evf_jax.beit3 import Beit3, Beit3Config, abstract_params, dummy_inputs
from evf_testing import torch_reference as tr
from evf_testing.beit3_reference import make_inputs, run_torch, torch_beit3

pytestmark = pytest.mark.usefixtures("fast_compile_unless_slow")  # tiny models: compiling is most of the time


TINY = Beit3Config.tiny()


@pytest.fixture(scope="module")
def tiny_torch():
  model = torch_beit3(TINY, seed=3)
  return model, tr.state_dict_numpy(model)


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def test_every_parameter_is_converted(tiny_torch):
  _, state = tiny_torch
  res = convert_beit3(state, TINY)
  assert set(_flat(res.params)) == set(_flat(abstract_params(TINY)))
  assert {src for src, _ in res.mapping.values()} == set(state)
  assert res.mapping["encoder/layers_1/self_attn/q_proj/B/kernel"] == (
      "encoder.layers.1.self_attn.q_proj.B.weight", "linear")


def test_round_trip_is_exact(tiny_torch):
  _, state = tiny_torch
  res = convert_beit3(state, TINY)
  back = R.revert(res.params, res.mapping)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_evf_sam_prefix_with_other_models_keys(tiny_torch):
  """An EVF-SAM-style dict: BEiT-3 under `mm_extractor.beit3.`, SAM and the projector beside it."""
  _, state = tiny_torch
  evf = {"mm_extractor.beit3." + k: v for k, v in state.items()}
  evf["visual_model.image_encoder.pos_embed"] = np.zeros((1, 4, 4, 8), np.float32)
  evf["text_hidden_fcs.0.0.weight"] = np.zeros((32, 32), np.float32)
  assert detect_prefix(evf) == "mm_extractor.beit3."
  a = convert_beit3(evf, TINY, prefix="mm_extractor.beit3.").params
  b = convert_beit3(evf, TINY, prefix=None).params
  ref = convert_beit3(state, TINY).params
  for k, v in _flat(ref).items():
    np.testing.assert_array_equal(_flat(a)[k], v)
    np.testing.assert_array_equal(_flat(b)[k], v)


def test_official_pth_layout(tiny_torch, tmp_path):
  """`{"model": {"beit3.*": ...}}` as the official BEiT-3 .pth files; io unwraps "model"."""
  import torch
  model, state = tiny_torch
  path = str(tmp_path / "beit3_tiny.pth")
  torch.save({"model": {"beit3." + k: v for k, v in model.state_dict().items()}}, path)
  loaded = ckpt_io.load_state_dict(path)
  assert detect_prefix(loaded) == "beit3."
  params = convert_beit3(loaded, TINY, prefix="beit3.").params
  images, ids = make_inputs(TINY)
  ours = Beit3(TINY).apply({"params": params}, image=jnp.asarray(images.transpose(0, 2, 3, 1)),
                           input_ids=jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), run_torch(model, images, ids), rtol=0, atol=1e-5)


def test_one_error_lists_every_problem(tiny_torch):
  _, state = tiny_torch
  bad = dict(state)
  del bad["encoder.layers.0.ffn.B.fc2.bias"]                              # missing
  bad["encoder.layers.0.self_attn.rel_pos.weight"] = np.zeros((3,), np.float32)  # extra
  bad["encoder.layers.1.self_attn.k_proj.A.weight"] = np.zeros((32, 31), np.float32)  # wrong shape
  bad["encoder.layers.7.final_layer_norm.A.weight"] = np.ones((32,), np.float32)  # layer the model lacks
  with pytest.raises(R.ConversionError) as e:
    convert_beit3(bad, TINY)
  msg = str(e.value)
  assert "4 problem(s)" in msg, msg
  assert "missing: model parameter 'encoder/layers_0/ffn/B/fc2/bias'" in msg
  assert "unexpected source key 'encoder.layers.0.self_attn.rel_pos.weight'" in msg
  assert "shape mismatch for 'encoder.layers.1.self_attn.k_proj.A.weight'" in msg
  assert "'encoder/layers_7/final_layer_norm/A/scale', which the model does not have" in msg


def test_wrong_size_and_prefix_errors(tiny_torch):
  _, state = tiny_torch
  with pytest.raises(R.ConversionError, match="no keys under prefix"):
    convert_beit3(state, TINY, prefix="beit3.")
  with pytest.raises(R.ConversionError, match="found 0"):
    detect_prefix({"foo": np.zeros(1)})
  two_layer_base = Beit3Config(num_layers=2, vocab_size=64010)
  with pytest.raises(R.ConversionError, match="shape mismatch"):
    convert_beit3(state, two_layer_base)


def _shapes_only(cfg: Beit3Config, prefix=""):
  """torchscale's state dict names and shapes for `cfg`, as zero-stride arrays (built on torch's meta
  device: no memory, no time)."""
  import torch
  with torch.device("meta"):
    model = torch_beit3(cfg, randomize=False)
  return {prefix + k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", ["base", "large"])
def test_presets_match_torchscale_shapes(size):
  """Names and shapes of EVF-SAM's torchscale BEiT-3 (base/large) convert onto our presets, and the
  size is inferred from them. Checked rule by rule without materialising the tensors."""
  import re
  from convert.beit3 import RULES
  cfg = Beit3Config.preset(size)
  state = _shapes_only(cfg, prefix="mm_extractor.beit3.")
  assert infer_beit3_size(state, prefix=None) == size
  assert infer_beit3_size(state, prefix="mm_extractor.beit3.") == size
  target = _flat(abstract_params(cfg))
  filled = set()
  for key, value in R.strip_prefix(state, "mm_extractor.beit3.").items():
    (m, rule), = [(m, r) for r in RULES if (m := re.fullmatch(r.pattern, key))]
    dest = m.expand(rule.target)
    assert R.TRANSFORMS[rule.transform][0](value).shape == target[dest].shape, key
    filled.add(dest)
  assert filled == set(target)


def test_infer_size_rejects_other_shapes(tiny_torch):
  _, state = tiny_torch
  with pytest.raises(R.ConversionError, match="neither base"):
    infer_beit3_size(state)


def test_config_json_round_trip():
  for name in ("tiny", "base", "large"):
    c = Beit3Config.preset(name)
    assert Beit3Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  assert Beit3Config.large().embed_dim == 1024 and Beit3Config.large().num_layers == 24
  assert Beit3Config.base().vision_positions == 199 and Beit3Config.base().max_source_positions == 1024
  with pytest.raises(ValueError, match="unknown Beit3Config field"):
    Beit3Config.from_dict({"embed_dim": 8, "bogus": 1})
  with pytest.raises(ValueError, match="divisible"):
    Beit3Config(embed_dim=30, num_heads=4)


def test_any_inputs_init_the_full_tree():
  m = Beit3(TINY)
  key = jax.random.key(0)
  img, ids = dummy_inputs(TINY)
  trees = [jax.eval_shape(lambda **kw: m.init(key, **kw), **kw)
           for kw in (dict(image=img, input_ids=ids), dict(image=img), dict(input_ids=ids))]
  names = [set(_flat(t["params"])) for t in trees]
  assert names[0] == names[1] == names[2]


@pytest.fixture(scope="module")
def micro():
  """A 1-layer, 16-wide model with random params (biases and LayerNorms away from 0/1) and inputs."""
  cfg = Beit3Config(embed_dim=16, num_layers=1, num_heads=2, ffn_dim=32, img_size=16, patch_size=8,
                    vocab_size=50, max_source_positions=16)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray([[0, 5, 9, 2, 1], [0, 7, 2, 1, 1]], jnp.int32)
  init = lambda k: nn.unbox(Beit3(cfg).init(k, image, ids))["params"]
  params = jax.jit(lambda k: jax.tree.map(lambda x: x + 0.1 * jax.random.normal(k, x.shape), init(k)))(
      jax.random.key(0))
  return cfg, params, image, ids


def _forward(model, micro):
  _, params, image, ids = micro
  return jax.jit(lambda p: model.apply({"params": p}, image=image, input_ids=ids))(params)


def test_remat_forward(micro):
  cfg = micro[0]
  np.testing.assert_allclose(_forward(Beit3(cfg, remat=True), micro), _forward(Beit3(cfg), micro),
                             rtol=0, atol=1e-6)


@pytest.mark.slow  # two gradient compiles: ~15-30 s on 2 busy cores
def test_remat_gradients(micro):
  cfg, params, image, ids = micro

  def grad(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, image=image, input_ids=ids) ** 2)
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grad(Beit3(cfg))), jax.tree.leaves(grad(Beit3(cfg, remat=True)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_compute(micro):
  cfg = micro[0]
  out = _forward(Beit3(cfg, dtype=jnp.bfloat16), micro)
  assert out.dtype == jnp.bfloat16
  ref = _forward(Beit3(cfg), micro)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1


def test_rejects_bad_inputs():
  m = Beit3(TINY)
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), *dummy_inputs(TINY)))["params"]
  with pytest.raises(ValueError, match="needs an image"):
    jax.eval_shape(lambda p: m.apply({"params": p}), params)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(lambda p: m.apply({"params": p}, image=jnp.zeros((1, 3, 32, 32))), params)
  with pytest.raises(ValueError, match="too long"):
    jax.eval_shape(lambda p: m.apply({"params": p}, input_ids=jnp.zeros((1, 1023), jnp.int32)), params)
