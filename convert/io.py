"""Reading PyTorch-side checkpoints into flat dicts of numpy arrays.

`.safetensors` is read without torch. `.pth` / `.bin` / `.pt` need torch and are read only with
`torch.load(weights_only=True)`, which refuses pickled code. bfloat16 tensors come back as
`ml_dtypes.bfloat16` numpy arrays; the converter casts them to the requested dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from evf_jax.errors import UserError, first_line


class CheckpointReadError(UserError, ValueError):
  """A checkpoint file is missing, of an unknown kind, or unreadable."""


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  out = {}
  # framework="flax" reads bfloat16 too (numpy's reader does not); keep the arrays on the host.
  with jax.default_device(jax.devices("cpu")[0]):
    with safe_open(path, framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k))
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # lazy: torch is needed for .pth/.bin files only, never for inference
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # lazy: torch is needed for .pth/.bin files only, never for inference
  except ImportError as e:
    raise CheckpointReadError(
        f"{path}: reading .pth/.bin files needs torch, a CPU build is enough (pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu); a .safetensors file needs no torch") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors, refused globals, truncation
    raise CheckpointReadError(f"{path}: not a loadable weights-only torch checkpoint ({e.__class__.__name__}: "
                              f"{first_line(e, empty='no message')})") from e
  for key in ("model", "state_dict", "module"):  # official BEiT-3 / lightning / deepspeed wrappers
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads one checkpoint file into {key: numpy array}."""
  if not os.path.isfile(path):
    raise CheckpointReadError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    try:
      return _read_safetensors(path)
    except CheckpointReadError:
      raise
    except Exception as e:
      raise CheckpointReadError(f"{path}: not a readable safetensors file ({e})") from e
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    return _read_torch(path)
  raise CheckpointReadError(f"{path}: unknown checkpoint format (expected .safetensors, .pth, .pt or .bin)")


def load_sharded(paths: Iterable[str]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for p in paths:
    part = load_state_dict(p)
    dup = set(part) & set(out)
    if dup:
      raise CheckpointReadError(f"{p}: tensors also present in another shard: {sorted(dup)[:5]}")
    out.update(part)
  return out


def load_hf_directory(directory: str) -> dict[str, np.ndarray]:
  """Reads the weights of a Hugging Face-style model directory.

  Looks, in order, for model.safetensors, a sharded model.safetensors.index.json,
  pytorch_model.bin, and a sharded pytorch_model.bin.index.json.
  """
  for single in ("model.safetensors", "pytorch_model.bin"):
    p = os.path.join(directory, single)
    if os.path.isfile(p):
      return load_state_dict(p)
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    p = os.path.join(directory, index)
    if os.path.isfile(p):
      try:
        with open(p) as f:
          content = json.load(f)
      except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{p}: not a valid shard index ({first_line(e)})") from e
      # Valid JSON of another shape (a list, a string, file names that are numbers) would fail below at .get,
      # .values() or os.path.join.
      weight_map: Any = content.get("weight_map") if isinstance(content, dict) else None
      if not isinstance(weight_map, dict) or not weight_map or not all(
          isinstance(v, str) for v in weight_map.values()):
        raise CheckpointReadError(f"{p}: not a valid shard index (expected a JSON object whose \"weight_map\" maps "
                                  "tensor names to shard file names)")
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
      if missing:
        raise CheckpointReadError(f"{directory}: shard files listed in {index} are missing: {missing}")
      return load_sharded(os.path.join(directory, f) for f in files)
  raise CheckpointReadError(
      f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin, or a sharded index)")
