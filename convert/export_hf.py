"""An evf-jax checkpoint -> the original's Hugging Face layout (`run.py export-hf`): the inverse of `convert.evf`.

Writes config.json, model.safetensors and the tokenizer files that EVF-SAM's PyTorch code loads
(`EvfSamModel` / `EvfSam2Model.from_pretrained`, `AutoTokenizer.from_pretrained(..., use_fast=False)`). The keys
come from the conversion tables read backwards (`convert.rules.source_mapping`), so a released checkpoint
converted and written back holds the same tensors under the same keys, and a model trained here (a training
run's `export/`) goes back to PyTorch.

The original builds only the released sizes (EVF-SAM: `sam_scale` "huge"; EVF-SAM2: "large" or "tiny"; BEiT-3
"base" or "large"). Other sizes are written all the same (config.json also holds evf-jax's whole model config
under "evf_jax", so `run.py convert` reads them back) with a note that the original code cannot build them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from convert.evf import EVF_JAX_KEY, TOKENIZER_FILES, check_out_dir, evf_rules, write_directory
from convert.evf_sam2 import evf_sam2_rules
from convert.rules import ConversionError, Rule, revert, source_mapping
from evf_jax import storage
from evf_jax.checkpoints import TOKENIZER_DIR, load_checkpoint
from evf_jax.errors import UserError
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.families import ModelConfig, family_of

HF_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# What an export holds: an existing --out holding anything else is never replaced.
EXPORT_ENTRIES = (HF_CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)
ARCHITECTURES = {"EVF-SAM": "EvfSamModel", "EVF-SAM2": "EvfSam2Model"}
# What the original's `initialize_evf_modules` builds (model/evf_sam.py, model/evf_sam2.py).
ORIGINAL_SAM_SCALES = {"EVF-SAM": ("huge",), "EVF-SAM2": ("large", "tiny")}
ORIGINAL_BEIT3_SCALES = ("base", "large")
# --precision -> (config.json torch_dtype, numpy dtype)
EXPORT_DTYPES = {"fp32": ("float32", np.float32), "bf16": ("bfloat16", ml_dtypes.bfloat16),
                 "fp16": ("float16", np.float16)}
TOKENIZER_CONFIG = {"tokenizer_class": "XLMRobertaTokenizer"}  # what AutoTokenizer needs to pick the slow XLM-R one


def rules_for(config: ModelConfig) -> list[Rule]:
  return evf_sam2_rules() if isinstance(config, EvfSam2Config) else evf_rules()


def torch_state_dict(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """The params in the original's key layout and torch tensor layout (numpy arrays, the params' dtype)."""
  what = f"{family_of(config).name} model (sam_scale={config.sam_scale}, " \
         f"mm_extractor_scale={config.mm_extractor_scale})"
  host = jax.tree.map(np.asarray, params)
  return revert(host, source_mapping(host, rules_for(config), what=what))


def original_cannot_build(config: ModelConfig) -> Optional[str]:
  """Why the original's `from_pretrained` cannot build this model, or None when it can."""
  family = family_of(config).name
  allowed = ORIGINAL_SAM_SCALES[family]
  if config.sam_scale not in allowed or config.mm_extractor_scale not in ORIGINAL_BEIT3_SCALES:
    return (f"the original {ARCHITECTURES[family]} builds sam_scale {' or '.join(allowed)} with "
            f"mm_extractor_scale base or large, not sam_scale={config.sam_scale}, "
            f"mm_extractor_scale={config.mm_extractor_scale}")
  preset = type(config).from_scales(config.sam_scale, config.mm_extractor_scale)
  sam_part = "sam2" if isinstance(config, EvfSam2Config) else "sam"
  for part in (sam_part, "beit3"):
    if getattr(config, part) != getattr(preset, part):
      return (f"its {part} is not the released size that the original builds from sam_scale={config.sam_scale}, "
              f"mm_extractor_scale={config.mm_extractor_scale}")
  return None


def hf_config(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  """config.json as the original reads it (`EvfConfig`: model_type, sam_scale, mm_extractor_scale, hidden_size,
  out_dim), plus evf-jax's whole model config."""
  return {"architectures": [ARCHITECTURES[family_of(config).name]], "model_type": "evf",
          "sam_scale": config.sam_scale, "mm_extractor_scale": config.mm_extractor_scale,
          "hidden_size": config.hidden_size, "out_dim": config.out_dim, "torch_dtype": torch_dtype,
          EVF_JAX_KEY: config.to_dict()}


def is_earlier_export(directory: str) -> bool:
  """Whether `directory` was written by `export_directory`: its config.json parses and holds evf-jax's model
  config (`EVF_JAX_KEY`). Any other Hugging Face directory (e.g. a download of the released model) is not."""
  try:
    with open(os.path.join(directory, HF_CONFIG_FILE)) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and isinstance(config.get(EVF_JAX_KEY), dict)


def _cast(state_dict: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
  dtype = EXPORT_DTYPES[precision][1]
  out, overflow = {}, []
  for key, value in state_dict.items():  # one copy per tensor at most: the file's contiguous array
    with np.errstate(over="ignore"):  # an overflow is reported below, in one line
      floating = value.dtype.kind == "f" or value.dtype == ml_dtypes.bfloat16
      cast = value.astype(dtype, copy=False) if floating else value
    if precision == "fp16" and np.isinf(cast).any() and not np.isinf(value).any():
      overflow.append(key)
    out[key] = np.ascontiguousarray(cast)
  if overflow:
    raise UserError(f"--precision fp16: {len(overflow)} tensor(s) exceed float16's range (e.g. {overflow[0]}); "
                    "export in bf16 or fp32")
  return out


def export_directory(checkpoint: str, out: str, precision: Optional[str] = None, overwrite: bool = False,
                     log: Callable[[str], Any] = print) -> dict[str, Any]:
  """The whole `run.py export-hf`: load the evf-jax checkpoint, write `out` (local) atomically. `precision`
  (fp32, bf16, fp16) defaults to the checkpoint's own. Returns what was written."""
  if precision is not None and precision not in EXPORT_DTYPES:
    raise UserError(f"--precision {precision}: expected one of {', '.join(EXPORT_DTYPES)}")
  if storage.is_url(out):
    raise UserError(f"--out {out}: a local directory is expected (upload it with huggingface-cli afterwards)")
  out = os.path.abspath(out)
  check_out_dir(out, overwrite, ours=is_earlier_export, kind="an evf-jax export", entries=EXPORT_ENTRIES)
  config, params, _ = load_checkpoint(checkpoint)
  if precision is None:  # the checkpoint's own
    precision = "bf16" if any(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params)) else "fp32"
  family = family_of(config).name
  log(f"writing {family} ({config.sam_scale}, {config.mm_extractor_scale}) in the original's layout, {precision}")
  try:
    state_dict = _cast(torch_state_dict(params, config), precision)
  except ConversionError as e:  # a rule table that cannot be read backwards: a bug, not a user mistake
    raise RuntimeError(str(e)) from None
  del params
  tok_src = storage.path(checkpoint) / TOKENIZER_DIR
  tokenizer_files = {name: (tok_src / name).read_bytes() for name in TOKENIZER_FILES if (tok_src / name).is_file()}
  tokenizer_files.setdefault("tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2).encode())
  cfg = hf_config(config, EXPORT_DTYPES[precision][0])

  def write(staging: str) -> None:
    os.makedirs(staging)
    weights = os.path.join(staging, WEIGHTS_FILE)
    save_file(state_dict, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates the file owner-only; a shared export must be readable
    with open(os.path.join(staging, HF_CONFIG_FILE), "w") as f:
      json.dump(cfg, f, indent=2)
    for name, data in tokenizer_files.items():
      with open(os.path.join(staging, name), "wb") as f:
        f.write(data)

  write_directory(out, write)
  log(f"wrote {out} ({len(state_dict)} tensors, {sum(v.size for v in state_dict.values()):,} parameters)")
  why = original_cannot_build(config)
  if why:
    log(f"note: {why}; these weights load only into a model built at their own sizes "
        f"(config.json \"{EVF_JAX_KEY}\" holds them; `run.py convert` reads them back)")
  if isinstance(config, EvfSam2Config) and not config.multimask_output:
    log("note: this model decodes SAM-2's mask 0 (model.multimask_output=False); the original's inference picks "
        "the best of masks 1-3, which training here does not teach")
  return {"out": out, "family": family, "precision": precision, "num_tensors": len(state_dict)}
