"""Converted-model directories: an orbax checkpoint of the params plus small JSON files.

Layout of a directory written by `save_model`:
  params/            orbax StandardCheckpointer output (the Flax parameter tree)
  model_config.json  {"model_type": ..., plus the model's config fields}
  provenance.json    where the weights came from (source files and hashes, converter version)
"""

from __future__ import annotations

from evf_jax.errors import UserError

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
PROVENANCE_FILE = "provenance.json"


class ModelDirError(UserError, ValueError):
  """A converted-model directory is missing files or holds another model type."""


def save_model(directory: str, params: Mapping[str, Any], config: Mapping[str, Any],
               provenance: Optional[Mapping[str, Any]] = None) -> None:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR), jax.tree.map(np.asarray, params))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  if provenance is not None:
    with open(os.path.join(directory, PROVENANCE_FILE), "w") as f:
      json.dump(dict(provenance), f, indent=2, sort_keys=True)


def read_json(path: str, error: type[Exception] = ModelDirError) -> Any:
  """A JSON file, or `error` naming the file when it is not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise error(f"{path}: not valid JSON ({e})") from None


def read_config(directory: str, expect_model_type: Optional[str] = None) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise ModelDirError(f"{directory}: no such checkpoint directory")
  if not os.path.isfile(path):
    raise ModelDirError(f"{directory}: not a converted evf-jax checkpoint ({CONFIG_FILE} is missing)")
  config = read_json(path)
  if expect_model_type is not None and config.get("model_type") != expect_model_type:
    raise ModelDirError(f"{directory}: holds model_type {config.get('model_type')!r}, "
                        f"expected {expect_model_type!r}")
  return config


def load_params(directory: str, abstract_params: Optional[Any] = None) -> Any:
  """Restores the params tree; with `abstract_params` (ShapeDtypeStructs, possibly sharded) it is
  restored with exactly those shapes, dtypes and shardings."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise ModelDirError(f"{directory}: the weights ({PARAMS_DIR}/) are missing")
  ckptr = ocp.StandardCheckpointer()
  if abstract_params is None:
    return ckptr.restore(path)
  return ckptr.restore(path, abstract_params)


def read_provenance(directory: str) -> Optional[dict[str, Any]]:
  """The checkpoint's provenance.json (where the weights came from), or None if it has none."""
  path = os.path.join(directory, PROVENANCE_FILE)
  return read_json(path) if os.path.isfile(path) else None
