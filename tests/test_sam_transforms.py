"""SAM pre/post-processing against the reference's semantics.

torchvision does not import here, so the reference's `ResizeLongestSide` module is loaded with a stand-in
`torchvision.transforms.functional` whose image functions refuse to run: its size and coordinate maths
is the real code. `apply_image` is `to_pil_image` + PIL bilinear resize on uint8 (torchvision's PIL path),
which is checked against PIL directly.
"""

from __future__ import annotations

import importlib
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from evf_jax.sam import transforms as T
from evf_testing import torch_reference as tr


@pytest.fixture
def ref_transforms(monkeypatch):
  tr.segment_anything_modeling()  # the package without its torchvision-importing __init__
  tvf = types.ModuleType("torchvision.transforms.functional")

  def _refuse(*a, **k):
    raise AssertionError("stand-in torchvision: image functions are not used by these tests")

  tvf.resize = tvf.to_pil_image = _refuse
  tv, tvt = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
  tv.transforms, tvt.functional = tvt, tvf
  for name, mod in [("torchvision", tv), ("torchvision.transforms", tvt), ("torchvision.transforms.functional", tvf)]:
    monkeypatch.setitem(sys.modules, name, mod)
  monkeypatch.delitem(sys.modules, "segment_anything.utils.transforms", raising=False)
  mod = importlib.import_module("segment_anything.utils.transforms")
  yield mod
  sys.modules.pop("segment_anything.utils.transforms", None)  # it holds the stand-in; don't leak it


SIZES = [(480, 640), (640, 427), (1024, 1024), (1, 1000), (333, 777), (1500, 999), (7, 5)]


@pytest.mark.parametrize("hw", SIZES)
def test_get_preprocess_shape(ref_transforms, hw):
  assert T.get_preprocess_shape(*hw, 1024) == ref_transforms.ResizeLongestSide.get_preprocess_shape(*hw, 1024)


def test_get_preprocess_shape_numbers():
  assert T.get_preprocess_shape(480, 640, 1024) == (768, 1024)
  assert T.get_preprocess_shape(640, 427, 1024) == (1024, 683)   # 427 * 1.6 = 683.2
  assert T.get_preprocess_shape(1, 1000, 1024) == (1, 1024)       # 1.024 rounds half up to 1
  assert T.get_preprocess_shape(333, 777, 1024) == (439, 1024)    # 438.86


@pytest.mark.parametrize("hw", [(480, 640), (640, 427)])
def test_apply_coords_and_boxes(ref_transforms, hw):
  ref = ref_transforms.ResizeLongestSide(1024)
  rng = np.random.default_rng(0)
  pts = rng.uniform(0, 500, size=(3, 5, 2))
  boxes = rng.uniform(0, 500, size=(4, 4))
  pts_before = pts.copy()
  np.testing.assert_array_equal(T.apply_coords(pts, hw), ref.apply_coords(pts, hw))
  np.testing.assert_array_equal(T.apply_boxes(boxes, hw), ref.apply_boxes(boxes, hw))
  np.testing.assert_array_equal(pts, pts_before)  # the input is not modified in place


@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (100, 60)])
def test_resize_longest_side_is_pil_bilinear_on_uint8(hw):
  img = np.random.default_rng(1).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
  out = T.resize_longest_side(img, 1024)
  h, w = T.get_preprocess_shape(*hw, 1024)
  assert out.shape == (h, w, 3) and out.dtype == np.uint8
  # torchvision: to_pil_image(uint8 HWC) is an RGB image; resize([h, w]) on PIL is img.resize((w, h), BILINEAR).
  expected = np.asarray(Image.fromarray(img, mode="RGB").resize((w, h), Image.BILINEAR))
  np.testing.assert_array_equal(out, expected)


def test_normalize_and_pad_matches_sam_preprocess():
  import torch
  m = tr.segment_anything_modeling()
  img = np.random.default_rng(2).integers(0, 256, size=(40, 64, 3), dtype=np.uint8)
  fake = types.SimpleNamespace(pixel_mean=torch.tensor(T.PIXEL_MEAN).view(-1, 1, 1),
                               pixel_std=torch.tensor(T.PIXEL_STD).view(-1, 1, 1),
                               image_encoder=types.SimpleNamespace(img_size=64))
  ref = m.Sam.preprocess(fake, torch.from_numpy(img.copy()).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
  ours = T.normalize_and_pad_np(img, 64)
  assert ours.shape == (64, 64, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
  # Jittable variant: pixels placed in a fixed buffer (garbage outside the valid region), valid (h, w) given.
  buf = np.random.default_rng(3).integers(0, 256, size=(2, 64, 64, 3)).astype(np.uint8)
  buf[0, :40, :64] = img
  dev = T.normalize_and_pad(jnp.asarray(buf), jnp.array([[40, 64], [64, 64]]), 64)
  np.testing.assert_allclose(np.asarray(dev[0]), ref, atol=1e-6, rtol=0)


def test_preprocess_outputs():
  img = np.random.default_rng(4).integers(0, 256, size=(640, 427, 3), dtype=np.uint8)
  x, input_size, original_size = T.preprocess(img)
  assert x.shape == (1024, 1024, 3) and input_size == (1024, 683) and original_size == (640, 427)
  assert np.all(x[:, 683:] == 0)


def test_normalisation_constants_are_segment_anythings():
  """SamConfig's pixel mean and std against `Sam`'s own defaults: the parity tests build their torch models from
  our config, so a wrong constant would pass them all."""
  import inspect
  params = inspect.signature(tr.segment_anything_modeling().Sam.__init__).parameters
  assert T.PIXEL_MEAN == tuple(params["pixel_mean"].default)
  assert T.PIXEL_STD == tuple(params["pixel_std"].default)
