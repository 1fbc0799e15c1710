"""The conversion engine on a toy model: layout transforms, strictness, one message listing every problem."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import rules as R
from evf_jax import layers


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.conv(4, (3, 3), name="patch_embed")(x)
    x = layers.layer_norm(1e-6, name="norm")(x)
    return layers.dense(5, ("embed", "mlp"), name="fc")(x)


TOY_RULES = [
    R.Rule(r"patch_embed\.weight", "patch_embed/kernel", "conv2d"),
    R.Rule(r"patch_embed\.bias", "patch_embed/bias"),
    R.Rule(r"norm\.weight", "norm/scale"),
    R.Rule(r"norm\.bias", "norm/bias"),
    R.Rule(r"fc\.(weight)", "fc/kernel", "linear"),
    R.Rule(r"fc\.bias", "fc/bias"),
]


def _abstract():
  return nn.unbox(jax.eval_shape(Toy().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]


def _torch_like_state(seed=0):
  rng = np.random.default_rng(seed)
  return {"patch_embed.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
          "patch_embed.bias": rng.normal(size=(4,)).astype(np.float32),
          "norm.weight": rng.normal(size=(4,)).astype(np.float32),
          "norm.bias": rng.normal(size=(4,)).astype(np.float32),
          "fc.weight": rng.normal(size=(5, 4)).astype(np.float32),
          "fc.bias": rng.normal(size=(5,)).astype(np.float32)}


def test_convert_transforms_and_round_trip():
  sd = _torch_like_state()
  res = R.convert(sd, TOY_RULES, _abstract())
  np.testing.assert_array_equal(res.params["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(res.params["patch_embed"]["kernel"][1, 2, 0, 3], sd["patch_embed.weight"][3, 0, 1, 2])
  back = R.revert(res.params, res.mapping)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_convert_reports_every_problem_at_once():
  sd = _torch_like_state()
  del sd["norm.bias"]                                   # missing
  sd["head.weight"] = np.zeros((2, 2), np.float32)      # extra
  sd["fc.bias"] = np.zeros((6,), np.float32)            # wrong shape
  with pytest.raises(R.ConversionError) as e:
    R.convert(sd, TOY_RULES, _abstract(), what="toy")
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "'head.weight'" in msg and "no rule matches" in msg
  assert "'norm/bias'" in msg and "not filled" in msg
  assert "'fc.bias'" in msg and "(6,)" in msg and "(5,)" in msg


def test_convert_ignore_and_double_match():
  sd = _torch_like_state()
  sd["pixel_mean"] = np.zeros(3, np.float32)
  R.convert(sd, TOY_RULES, _abstract(), ignore=[r"pixel_mean"])
  with pytest.raises(R.ConversionError, match="matches 2 rules"):
    R.convert(sd, TOY_RULES + [R.Rule(r"fc\.bias", "fc/bias")], _abstract(), ignore=[r"pixel_mean"])


def test_convert_casts_float_dtypes():
  import ml_dtypes
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _torch_like_state().items()}
  res = R.convert(sd, TOY_RULES, _abstract())
  assert res.params["fc"]["kernel"].dtype == np.float32
  res16 = R.convert(sd, TOY_RULES, _abstract(), dtype=jnp.bfloat16)
  assert res16.params["fc"]["kernel"].dtype == jnp.bfloat16
