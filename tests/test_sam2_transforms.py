"""EVF-SAM2's image-path preprocessing against torch: the uint8 bilinear squash must be bit-exact (float bilinear
plus rounding is not: the last test shows by how much)."""

from __future__ import annotations

import numpy as np
import pytest

from evf_jax.sam2 import SAM2_CONFIGS
from evf_jax.sam2.transforms import preprocess, resize_uint8_bilinear
from evf_testing import torch_reference as tr
from evf_testing.sam2_reference import sam2_input


def _torch_resize(image, hw, dtype=None):
  torch = tr.import_torch()
  x = torch.from_numpy(image).permute(2, 0, 1)[None]
  x = x if dtype is None else x.to(dtype)
  return torch.nn.functional.interpolate(x, hw, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("hw,out", [((480, 640), (1024, 1024)), ((1500, 2000), (1024, 1024)),
                                    ((333, 1111), (512, 512)), ((90, 120), (128, 128)), ((7, 5), (13, 3)),
                                    ((64, 40), (64, 64)), ((40, 64), (64, 64))], ids=str)
@pytest.mark.parametrize("channels", [3, 1])
def test_resize_uint8_bilinear_is_bit_exact(hw, out, channels):
  """Up, down, mixed, one axis unchanged (that pass is skipped), and a single channel."""
  image = np.random.default_rng(hw[0] * hw[1]).integers(0, 256, size=(*hw, channels), dtype=np.uint8)
  np.testing.assert_array_equal(resize_uint8_bilinear(image, out), _torch_resize(image, out))


def test_preprocess_equals_evf_sam2_inference():
  cfg = SAM2_CONFIGS["toy"]
  image = np.random.default_rng(1).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
  ours = preprocess(image, cfg)
  ref = sam2_input(image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std)[0].permute(1, 2, 0).numpy()
  assert ours.shape == (cfg.image_size, cfg.image_size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_float_bilinear_is_not_the_uint8_kernel():
  """Why the kernel is reproduced: float bilinear + rounding differs by one level on a large share of pixels."""
  torch = tr.import_torch()
  image = np.random.default_rng(2).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
  rounded = np.clip(np.round(_torch_resize(image, (1024, 1024), torch.float32)), 0, 255)
  differ = rounded != resize_uint8_bilinear(image, (1024, 1024))
  print(f"float+round differs on {differ.mean():.1%} of values")
  assert 0.1 < differ.mean() < 0.3 and np.abs(rounded - resize_uint8_bilinear(image, (1024, 1024))).max() == 1
  with pytest.raises(ValueError, match="uint8"):
    resize_uint8_bilinear(image.astype(np.float32), (8, 8))


def test_normalisation_constants_are_sam2s():
  """Sam2Config's pixel mean and std are sam2's own (`SAM2Transforms`, in 0..1 units), read from its source: the
  module imports torchvision, which cannot be imported beside our torch. The parity tests take the constants from
  our config, so only this test sees a wrong one."""
  import ast
  import importlib.util
  import os
  path = os.path.join(importlib.util.find_spec("sam2").submodule_search_locations[0], "utils", "transforms.py")
  found = {}
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and \
        node.targets[0].attr in ("mean", "std"):
      found[node.targets[0].attr] = ast.literal_eval(node.value)
  for name in ("mean", "std"):
    for cfg in SAM2_CONFIGS.values():
      np.testing.assert_allclose(getattr(cfg, f"pixel_{name}"), np.array(found[name]) * 255, rtol=0, atol=1e-9)
