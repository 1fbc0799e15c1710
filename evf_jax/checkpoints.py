"""Converted-model directories: an orbax checkpoint of the params plus small JSON files.

Layout of a directory written by `save_model`:
  params/            orbax StandardCheckpointer output (the Flax parameter tree)
  model_config.json  {"model_type": ..., plus the model's config fields}
  provenance.json    where the weights came from (source files and hashes, converter version, training run)
  tokenizer/         the sentencepiece model and the reference's tokenizer files
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: I001 (the default handler's store; no public path)

from evf_jax import storage
from evf_jax.errors import UserError, first_line, innermost
from evf_jax.families import BY_MODEL_TYPE, ModelConfig
from evf_jax.tokenizer import MAX_TEXT_LEN, MIN_TEXT_LEN, TextTokenizer, check_fits_model

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
PARAM_DTYPE_KEY = "param_dtype"  # beside the model config's own keys: the dtype the weights are stored in
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PROVENANCE_FILE = "provenance.json"
TOKENIZER_DIR = "tokenizer"  # the sentencepiece model and the reference's tokenizer files

# orbax writes an array replicated over R devices as R slices, one per replica ("replica-parallel", its default
# off GPUs), and cuts each slice out with an op compiled per shape: hundreds of small compiles at a run's first
# save (27 of the 111 s of a 6-step run on 8 CPU devices). Arrays whose slices would be smaller than this are
# written whole by one replica, as on GPUs; large ones are still spread over the replicas.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_array_handler_set = False


def use_array_handler() -> None:
  """Registers orbax's jax.Array handler with `MIN_REPLICA_SLICE_BYTES` (orbax keeps one handler per process);
  called before every save of ours."""
  global _array_handler_set
  if _array_handler_set:
    return
  with absl_errors_only():  # no warning that the default handler is overridden: that is the intent
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  _array_handler_set = True


@contextlib.contextmanager
def absl_errors_only():
  """Only errors of what orbax logs (through absl) meanwhile: around calls whose warnings say what we intend."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class ModelDirError(UserError, ValueError):
  """A converted-model directory is missing files or holds another model type."""


def save_model(directory: str, params: Mapping[str, Any], config: Union[ModelConfig, Mapping[str, Any]],
               provenance: Optional[Mapping[str, Any]] = None,
               tokenizer_files: Optional[Mapping[str, str]] = None) -> None:
  """Writes a checkpoint directory that `load_checkpoint` reads. `params` may be host arrays or (possibly sharded)
  jax arrays; `config` an `EvfConfig`/`EvfSam2Config` or its `to_dict()` (plus an optional "param_dtype");
  `tokenizer_files` ({name: source file}; `tokenizer.SPM_FILE` at least, for `load_checkpoint`) are copied into
  tokenizer/. With several processes, every process calls this and process 0 writes the other files. `directory`
  may be a gs:// URL; one that already holds a checkpoint is refused (UserError) before anything is written."""
  config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  if config.get("model_type") not in BY_MODEL_TYPE:
    raise UserError(f"config: model_type {config.get('model_type')!r} is not one of {sorted(BY_MODEL_TYPE)}")
  directory = storage.resolve(directory, "checkpoint directory")
  if storage.path(os.path.join(directory, PARAMS_DIR)).exists():
    raise UserError(f"{directory} already holds a checkpoint ({PARAMS_DIR}/); write to a new directory")
  storage.path(directory).mkdir(parents=True, exist_ok=True)
  use_array_handler()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR),
             jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params))
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    storage.path(os.path.join(directory, CONFIG_FILE)).write_text(json.dumps(config, indent=2, sort_keys=True))
    if provenance is not None:
      storage.path(os.path.join(directory, PROVENANCE_FILE)).write_text(
          json.dumps(dict(provenance), indent=2, sort_keys=True))
    if tokenizer_files:  # None or {}: none
      tokenizer_dir = storage.path(os.path.join(directory, TOKENIZER_DIR))
      tokenizer_dir.mkdir(parents=True, exist_ok=True)
      for name, source in tokenizer_files.items():
        storage.path(source).copy(tokenizer_dir / name, overwrite=True)


def read_config(directory: str, expect_model_type: Union[str, Sequence[str], None] = None) -> dict[str, Any]:
  """model_config.json; `expect_model_type`: the model_type (or one of the model_types) it must hold."""
  directory = storage.resolve(directory, "checkpoint directory") if storage.is_url(directory) else directory
  path = os.path.join(directory, CONFIG_FILE)
  if not storage.path(directory).is_dir():
    what = "a file, not a checkpoint directory" if storage.path(directory).exists() else "no such checkpoint directory"
    raise ModelDirError(f"{directory}: {what}")
  if not storage.path(path).is_file():
    raise ModelDirError(f"{directory}: not a converted evf-jax checkpoint ({CONFIG_FILE} is missing)")
  config = storage.read_json(path, ModelDirError)
  if expect_model_type is not None:
    allowed = [expect_model_type] if isinstance(expect_model_type, str) else list(expect_model_type)
    if config.get("model_type") not in allowed:
      raise ModelDirError(f"{directory}: holds model_type {config.get('model_type')!r}, expected "
                          + " or ".join(repr(t) for t in allowed))
  return config


def load_params(directory: str, target: Optional[Any] = None) -> Any:
  """Restores the params tree; with `target` (ShapeDtypeStructs, possibly sharded) it is restored with
  exactly those shapes, dtypes and shardings; leaves without a sharding go whole to this process's first
  device (orbax would otherwise refuse, in a multi-process run, a checkpoint written by another topology)."""
  path = os.path.join(storage.resolve(directory, "checkpoint directory"), PARAMS_DIR)
  if not storage.path(path).is_dir():
    raise ModelDirError(f"{directory}: the weights ({PARAMS_DIR}/) are missing")
  ckptr = ocp.StandardCheckpointer()
  if target is None:
    return ckptr.restore(path)
  stored = ckptr.metadata(path).item_metadata
  check_shapes(directory, getattr(stored, "tree", stored), target)  # orbax's own refusal names no parameter
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda t: t if getattr(t, "sharding", None) is not None
                        else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=local), target)
  return ckptr.restore(path, target)


def read_provenance(directory: str) -> Optional[dict[str, Any]]:
  """The checkpoint's provenance.json (where the weights came from), or None if it has none."""
  path = os.path.join(directory, PROVENANCE_FILE)
  return storage.read_json(path, ModelDirError) if storage.path(path).is_file() else None


def stored_param_dtype(directory: str, raw: dict) -> str:
  """The name of the dtype the checkpoint's weights are stored in: its model_config.json's `param_dtype`,
  float32 where it has none (checkpoints converted before the key existed)."""
  name = raw.get(PARAM_DTYPE_KEY, "float32")
  if name not in PARAM_DTYPES:  # any other value was read as float32
    raise ModelDirError(f"{directory}: {CONFIG_FILE} has {PARAM_DTYPE_KEY} {name!r}; expected one of "
                        f"{sorted(PARAM_DTYPES)}")
  return name


def _model_config(directory: str, raw: dict) -> tuple[ModelConfig, str]:
  """The model config model_config.json holds, and the name of the dtype its weights are stored in."""
  family = BY_MODEL_TYPE[raw["model_type"]]
  param_dtype = stored_param_dtype(directory, raw)
  raw = {k: v for k, v in raw.items() if k != PARAM_DTYPE_KEY}
  try:
    return family.config_class.from_dict(raw), param_dtype
  except (KeyError, TypeError, ValueError) as e:
    raise ModelDirError(f"{directory}: {CONFIG_FILE} is not a valid {family.name} config ({e})") from None


def text_positions(directory: str) -> int:
  """The longest prompt (tokens, <s> and </s> included) the checkpoint's BEiT-3 has positions for."""
  config, _ = _model_config(directory, read_config(directory, expect_model_type=tuple(BY_MODEL_TYPE)))
  return config.beit3.max_text_len


def load_checkpoint(directory: str, max_text_len: Optional[int] = None) -> tuple[ModelConfig, Any, TextTokenizer]:
  """An EVF-SAM or EVF-SAM2 checkpoint directory (`run.py convert`, or a training run's export) -> (its config,
  an `EvfConfig` or `EvfSam2Config` after the stored model_type; params on the host; TextTokenizer).

  Every problem with the directory (missing, another model type, bad config, unreadable weights) is a
  `ModelDirError` with a one-line message.
  """
  raw = read_config(directory, expect_model_type=tuple(BY_MODEL_TYPE))
  family = BY_MODEL_TYPE[raw["model_type"]]
  config, param_dtype = _model_config(directory, raw)
  limit = config.beit3.max_text_len  # BEiT-3's text position table: a longer prompt fails inside the model
  if max_text_len is not None and not MIN_TEXT_LEN <= max_text_len <= limit:
    raise UserError(f"max text length {max_text_len}: expected {MIN_TEXT_LEN} (<s>, a token and </s>) to {limit}, "
                    "this model's text positions")
  tok_dir = os.path.join(directory, TOKENIZER_DIR)
  tokenizer = TextTokenizer(tok_dir, min(MAX_TEXT_LEN, limit) if max_text_len is None else max_text_len)
  check_fits_model(tokenizer, config.beit3, lambda message: ModelDirError(f"{directory}: {message}"))
  target = family.abstract_params(config, param_dtype=PARAM_DTYPES[param_dtype])
  try:
    with quiet_if_restore_fails():
      params = load_params(directory, target)
  except ModelDirError:
    raise
  except Exception as e:  # orbax: missing, mismatching or damaged arrays
    raise ModelDirError(f"{directory}: cannot restore the weights ({first_line(innermost(e))[:300]})") from None
  return config, params, tokenizer


class _UnretrievedTaskErrors(logging.Filter):
  """asyncio's "Task exception was never retrieved" records (with the task's traceback): the other reads of a
  restore that failed, garbage-collected after the error that counts was raised."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().split("\n", 1)[0].endswith("exception was never retrieved")  # then the task


@contextlib.contextmanager
def quiet_if_restore_fails():
  """Around an orbax restore: if it fails, the errors of its other reads are not printed. Once orbax has given
  up and closed its asyncio loop, TensorStore's other reads still call back into it ("Event loop is closed", an
  unraisable error each) or end as tasks nobody awaits (asyncio logs each when it is collected): hundreds of
  traceback lines after the one-line error. The filters stay after a failure, since those reads finish later."""
  previous = sys.unraisablehook

  def filtered(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = filtered
  unretrieved = _UnretrievedTaskErrors()
  logging.getLogger("asyncio").addFilter(unretrieved)
  yield
  sys.unraisablehook = previous  # reached only when the restore succeeded
  logging.getLogger("asyncio").removeFilter(unretrieved)


def check_shapes(directory: str, params: Any, target: Any) -> None:
  """ModelDirError naming the first parameter whose stored shape (`params`: arrays or orbax's metadata) is not
  the one the config implies, as the model would fail at its first call."""
  want = {jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(target)}
  for key, value in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(key, simple=True, separator="/")
    shape = tuple(getattr(value, "shape", None) or np.shape(value))
    if name in want and shape != tuple(want[name]):
      raise ModelDirError(f"{directory}: {CONFIG_FILE} does not fit the weights: {name} is stored as "
                          f"{shape}, the config implies {tuple(want[name])}")
