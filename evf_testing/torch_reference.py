"""Helpers for parity tests: importing the PyPI PyTorch references and giving them random weights.

- `segment_anything/__init__.py` imports torchvision (only for ResizeLongestSide.apply_image), which does not
  import beside the CPU torch here; we import `segment_anything.modeling` without running the package __init__.
- `torchscale/component/droppath.py` imports `timm.models.layers.drop_path` (used only when drop_path_rate > 0);
  when timm is not importable we register a tiny stand-in module.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest


def import_torch():
  return pytest.importorskip("torch")


def segment_anything_modeling():
  """Returns the `segment_anything.modeling` module from PyPI's segment-anything 1.0."""
  import_torch()
  try:
    return importlib.import_module("segment_anything.modeling")
  except ImportError:
    pass
  spec = importlib.util.find_spec("segment_anything")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("segment-anything is not installed")
  for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
    del sys.modules[name]
  pkg = types.ModuleType("segment_anything")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["segment_anything"] = pkg
  return importlib.import_module("segment_anything.modeling")


def torchscale_beit3():
  """Returns torchscale's (EncoderConfig, BEiT3) classes."""
  import_torch()
  try:
    importlib.import_module("timm.models.layers")
  except Exception:
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")

    def drop_path(x, drop_prob=0.0, training=False):
      if drop_prob != 0.0 and training:
        raise NotImplementedError("stand-in timm: drop_path is only supported with drop_prob=0")
      return x

    layers.drop_path = drop_path
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
  try:
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3
  except ImportError:
    pytest.skip("torchscale is not installed")
  return EncoderConfig, BEiT3


def randomize_(module, seed: int = 0) -> None:
  """Re-draws every floating parameter and buffer of a torch module, seeded and non-trivial.

  1-D weights (LayerNorm scales) ~ 1 + 0.2 N(0,1); 1-D biases ~ 0.2 N(0,1); tables of embeddings,
  tokens and positions ~ 0.5 N(0,1); other tensors ~ N(0,1) / sqrt(fan_in).
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      if not t.is_floating_point():
        continue
      r = torch.randn(t.shape, generator=g, dtype=torch.float32)
      leaf = name.rsplit(".", 1)[-1]
      if t.ndim <= 1:
        v = 1.0 + 0.2 * r if leaf == "weight" else 0.2 * r
      elif any(s in name for s in ("embed", "token", "pos", "rel_pos", "gaussian")) and "proj" not in name:
        v = 0.5 * r
      else:
        fan_in = max(1, int(np.prod(t.shape[1:])))
        v = r / math.sqrt(fan_in)
      t.copy_(v.to(t.dtype))


def state_dict_numpy(module, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def save_safetensors(state: dict[str, np.ndarray], path: str) -> str:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path
