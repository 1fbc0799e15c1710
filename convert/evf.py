"""EVF-SAM and EVF-SAM2 checkpoints (Hugging Face layout) -> an evf-jax model directory.

Source keys: `visual_model.*` (SAM), `mm_extractor.beit3.*` (BEiT-3), `text_hidden_fcs.0.{0,2}.*`
(the projector). The SAM and BEiT-3 tables are reused under those prefixes, so there is one rule per
tensor kind in the whole project. Both families' config.json say `model_type: "evf"`, and `sam_scale: "large"`
names SAM ViT-L in one and SAM-2 Hiera-L in the other, so `convert_directory` tells them apart by the weights'
keys (`convert.evf_sam2.is_evf_sam2`: a Hiera trunk under `visual_model.`) and EVF-SAM2's tensors go through
`convert.evf_sam2`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
from typing import Any, Callable, Collection, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from convert import beit3 as beit3_conv
from convert import sam as sam_conv
from convert import sam2 as sam2_conv
from convert.io import CheckpointReadError, load_hf_directory
from convert.rules import (
  RULES_VERSION,
  ConversionError,
  ConversionResult,
  Rule,
  convert,
)
from evf_jax import __version__, storage
from evf_jax.checkpoints import (CONFIG_FILE, PARAM_DTYPE_KEY, PARAMS_DIR, PROVENANCE_FILE, TOKENIZER_DIR,
                                 save_model)
from evf_jax.errors import UserError, first_line
from evf_jax.evf import BEIT3_SCALES, MODEL_TYPE, SAM_SCALES, EvfConfig, abstract_params
from evf_jax.evf_sam2 import SAM2_SCALES, EvfSam2Config
from evf_jax.families import ModelConfig, family_of
from evf_jax.tokenizer import TextTokenizer
from evf_jax.train import checkpointing

SAM_PREFIX = "visual_model."
BEIT3_PREFIX = "mm_extractor.beit3."
EVF_JAX_KEY = "evf_jax"  # config.json of `run.py export-hf`: evf-jax's whole model config (sizes of any kind)
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What `convert_directory` writes in --out: an existing --out holding anything else is never replaced.
CHECKPOINT_ENTRIES = (CONFIG_FILE, PARAMS_DIR, PROVENANCE_FILE, TOKENIZER_DIR)


def _prefixed(rules, src_prefix: str, dst_prefix: str) -> list[Rule]:
  return [Rule(re.escape(src_prefix) + r.pattern, dst_prefix + r.target, r.transform) for r in rules]


def evf_rules() -> list[Rule]:
  return [*_prefixed(sam_conv.sam_rules(), SAM_PREFIX, "sam/"),
          *_prefixed(beit3_conv.RULES, BEIT3_PREFIX, "beit3/"),
          Rule(r"text_hidden_fcs\.0\.0\.weight", "projector/fc1/kernel", "linear"),
          Rule(r"text_hidden_fcs\.0\.0\.bias", "projector/fc1/bias"),
          Rule(r"text_hidden_fcs\.0\.2\.weight", "projector/fc2/kernel", "linear"),
          Rule(r"text_hidden_fcs\.0\.2\.bias", "projector/fc2/bias")]


def convert_evf(state_dict: Mapping[str, np.ndarray], config: EvfConfig,
                dtype: Optional[Any] = None) -> ConversionResult:
  """Every tensor of an EVF-SAM state dict onto `EvfSam(config)`'s params; strict, one error for all."""
  ignore = [re.escape(SAM_PREFIX) + p for p in sam_conv.SAM_IGNORE]
  ignore += [re.escape(BEIT3_PREFIX) + p for p in beit3_conv.IGNORE]
  return convert(state_dict, evf_rules(), abstract_params(config), ignore=ignore, dtype=dtype,
                 what=f"EVF-SAM checkpoint (sam_scale={config.sam_scale}, "
                      f"mm_extractor_scale={config.mm_extractor_scale})")


def check_model_type(hf_config: Mapping[str, Any], where: str = "config.json") -> None:
  """The released config.json of either family says model_type "evf"."""
  if not isinstance(hf_config, Mapping):  # valid JSON, but a list or a string has no fields to read
    raise UserError(f"{where}: expected a JSON object, found {type(hf_config).__name__}")
  if hf_config.get("model_type") != MODEL_TYPE:
    raise UserError(f"{where}: model_type is {hf_config.get('model_type')!r}, not an EVF-SAM / EVF-SAM2 "
                    f"checkpoint (expected {MODEL_TYPE!r}; EfficientSAM variants are not supported)")


def config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json", sam2: bool = False) -> ModelConfig:
  """EvfConfig (or with `sam2`, EvfSam2Config) from the reference's config.json (`model_type`, `sam_scale`,
  `mm_extractor_scale`, ...). Which family it is comes from the weights (`convert.evf_sam2.is_evf_sam2`)."""
  check_model_type(hf_config, where)
  family, config_class, scales = ("EVF-SAM2", EvfSam2Config, SAM2_SCALES) if sam2 else (
      "EVF-SAM", EvfConfig, SAM_SCALES)
  # EVF-SAM's original accepts only "huge", EVF-SAM2's "large" and "tiny"; check_sizes checks the default.
  sam_scale = hf_config.get("sam_scale", "large" if sam2 else "huge")
  beit_scale = hf_config.get("mm_extractor_scale")
  if not isinstance(sam_scale, str) or sam_scale not in scales:  # a list is unhashable
    raise UserError(f"{where}: sam_scale {sam_scale!r} is not one of {family}'s {sorted(scales)} (the weights "
                    f"are {family}'s)")
  if not isinstance(beit_scale, str) or beit_scale not in BEIT3_SCALES:
    raise UserError(f"{where}: mm_extractor_scale {beit_scale!r} is not one of {list(BEIT3_SCALES)}")
  config = config_class.from_scales(sam_scale, beit_scale)
  if EVF_JAX_KEY in hf_config:  # written by `run.py export-hf`: the model's own sizes, which may be no preset's
    if not isinstance(hf_config[EVF_JAX_KEY], Mapping):
      raise UserError(f"{where}: {EVF_JAX_KEY!r} is not a JSON object but a {type(hf_config[EVF_JAX_KEY]).__name__}")
    try:
      own = config_class.from_dict(hf_config[EVF_JAX_KEY])
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a nested part of the wrong JSON type
      raise UserError(f"{where}: {EVF_JAX_KEY!r} is not a valid {family} config ({e})") from None
    if (own.sam_scale, own.mm_extractor_scale) != (sam_scale, beit_scale):
      raise UserError(f"{where}: {EVF_JAX_KEY!r} names sam_scale={own.sam_scale}, mm_extractor_scale="
                      f"{own.mm_extractor_scale}, the file sam_scale={sam_scale}, mm_extractor_scale={beit_scale}")
    config = own
  for key, want in (("hidden_size", config.hidden_size), ("out_dim", config.out_dim)):
    if key in hf_config and not _is_int(hf_config[key], want):
      raise UserError(f"{where}: {key}={hf_config[key]} does not fit sam_scale={sam_scale} / "
                      f"mm_extractor_scale={beit_scale} (expected {want})")
  return config


def _is_int(value: Any, want: int) -> bool:
  try:
    return int(value) == want
  except (TypeError, ValueError):  # a list, null, or "abc" in the file
    return False


def check_sizes(state_dict: Mapping[str, Any], config: ModelConfig) -> None:
  """The named sizes must be the sizes of the tensors (a clearer message than shape mismatches)."""
  problems = []
  sam2 = isinstance(config, EvfSam2Config)
  sam = config.sam2 if sam2 else config.sam
  if sam.name not in ("tiny", "toy"):  # our test-only sizes
    infer = sam2_conv.infer_sam2_size if sam2 else sam_conv.infer_sam_size
    got = infer(state_dict, prefix=SAM_PREFIX)
    if got != sam.name:
      problems.append(f"config says sam_scale={config.sam_scale} ({sam.name}) but the SAM "
                      f"weights are {got}")
  if config.mm_extractor_scale != "tiny":
    got = beit3_conv.infer_beit3_size(state_dict, prefix=BEIT3_PREFIX)
    if got != config.mm_extractor_scale:
      problems.append(f"config says mm_extractor_scale={config.mm_extractor_scale} but the BEiT-3 "
                      f"weights are {got}")
  if problems:
    raise ConversionError(problems, f"{family_of(config).name} checkpoint")


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def is_local_path(src: str) -> bool:
  """Whether `src` is spelled as a path, never a hub id: absolute, ~, ./ or ../, or more than owner/name."""
  return (src in (".", "..") or src.startswith(("/", "~", "./", "../", os.sep)) or src.count("/") > 1
          or src.endswith("/") or (os.altsep is not None and os.altsep in src))


def resolve_source(src: str) -> str:
  """A local directory as is; otherwise a hub id ("owner/name") downloaded with huggingface_hub."""
  if os.path.isdir(src):
    return src
  if os.path.exists(src):
    raise UserError(f"--src {src}: expected a model directory (config.json + weights), got a file")
  if is_local_path(src):
    raise UserError(f"--src {src}: no such directory")
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
    raise UserError(f"--src {src}: no such directory, and not a Hugging Face hub id like 'YxZhang/evf-sam'")
  try:
    import huggingface_hub  # lazy: only a hub id needs it (and the network)
    return huggingface_hub.snapshot_download(repo_id=src, allow_patterns=["config.json", *WEIGHT_FILES,
                                                           "model-*.safetensors", "pytorch_model-*.bin",
                                                           *TOKENIZER_FILES])
  except Exception as e:  # offline, unknown repo, auth: all user-side problems
    raise UserError(f"cannot download {src!r} from the Hugging Face hub ({first_line(e)[:200]}); download it "
                    "where the network allows and pass the local directory as --src") from None


def check_out_dir(out: str, overwrite: bool, ours: Optional[Callable[[str], bool]] = None,
                  kind: str = "an evf-jax checkpoint", entries: Optional[Collection[str]] = None) -> None:
  """--out may be new or empty; with `overwrite`, also a directory that `ours(out)` says this command wrote
  (default: it holds model_config.json) and that holds nothing but `entries`, the names this command writes
  (default: `CHECKPOINT_ENTRIES` when `ours` is the default; None otherwise: not checked). Anything else a user
  owns is never replaced. Checked before any work, as is that --out can be created (or replaced)."""
  storage.check_output_dir(out, "--out")
  checkpointing.check_not_in_a_model(out, "--out", itself=False)  # it may replace a checkpoint, not one around it
  if entries is None and ours is None:
    entries = CHECKPOINT_ENTRIES
  if os.path.isdir(out) and os.listdir(out):
    if not (ours or _holds_model_config)(out):  # --overwrite would not help: do not suggest it
      raise UserError(f"--out {out} exists and is not {kind} directory; refusing to overwrite it "
                      "(choose an empty or new directory)")
    foreign = sorted(set(os.listdir(out)) - set(entries)) if entries is not None else []
    if foreign:  # replacing the directory would delete it; --overwrite would not help either
      raise UserError(f"--out {out} holds {foreign[0]}, which {kind} directory does not; refusing to overwrite "
                      "it (move it out, or choose an empty or new directory)")
    if not overwrite:
      raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
  if os.path.isdir(out):  # write_directory renames what it replaces (through a link: the link's target)
    parent = os.path.dirname(os.path.realpath(out))
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f"--out {out}: cannot replace it, cannot write in {parent} (permission denied)")


def _holds_model_config(out: str) -> bool:
  return os.path.isfile(os.path.join(out, CONFIG_FILE))


def write_directory(out: str, write: Callable[[str], None]) -> None:
  """`write(staging)` fills a directory next to `out`, which then replaces `out`: a failed write never leaves a
  half-written or destroyed directory behind. When `out` is a symbolic link, the directory it names is replaced
  and the link kept."""
  out = os.path.realpath(out)  # renaming the link itself would replace it and leave its target behind
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  try:
    write(staging)
    if not os.path.isdir(out):
      os.replace(staging, out)
      return
    old = f"{out}.old-{os.getpid()}"
    os.replace(out, old)
    try:
      os.replace(staging, out)
    except OSError:
      os.replace(old, out)  # the user's directory back where it was
      raise
    shutil.rmtree(old)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# --precision of `run.py convert` -> the parameter dtype stored in model_config.json ("param_dtype").
STORED_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def convert_directory(src: str, out: str, precision: str = "fp32", overwrite: bool = False,
                      log=print) -> dict[str, Any]:
  """The whole `run.py convert`: read, check, convert, and write `out` atomically.

  The new checkpoint is written next to `out` and moved into place only when complete, so a failed
  conversion never leaves a half-written or destroyed directory behind.
  """
  if precision not in STORED_DTYPES:
    raise UserError(f"--precision {precision}: expected one of {', '.join(STORED_DTYPES)}")
  dtype = STORED_DTYPES[precision]
  out = os.path.abspath(out)
  check_out_dir(out, overwrite)
  src_dir = resolve_source(src)
  cfg_path = os.path.join(src_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{src_dir}: config.json is missing (not a Hugging Face-style EVF-SAM directory)")
  hf_config = storage.read_json(cfg_path)
  check_model_type(hf_config, cfg_path)
  tok = os.path.join(src_dir, TOKENIZER_FILES[0])
  if not os.path.isfile(tok):
    raise UserError(f"{src_dir}: the tokenizer ({TOKENIZER_FILES[0]}) is missing")
  TextTokenizer(tok)  # loaded once: a junk or empty file would be copied and refused only by the first predict

  log(f"reading weights from {src_dir}")
  try:
    state_dict = load_hf_directory(src_dir)
  except CheckpointReadError:
    raise
  from convert import evf_sam2  # lazy: convert.evf_sam2 builds on this module (a top-level import is circular)
  sam2 = evf_sam2.is_evf_sam2(state_dict)
  config = config_from_hf(hf_config, cfg_path, sam2=sam2)
  if EVF_JAX_KEY not in hf_config:  # sizes named by scale: say which disagree with the weights
    check_sizes(state_dict, config)
  family = family_of(config).name
  log(f"converting {len(state_dict)} tensors ({family}: sam_scale={config.sam_scale}, "
      f"mm_extractor_scale={config.mm_extractor_scale}, dtype={dtype})")
  convert_fn = evf_sam2.convert_evf_sam2 if sam2 else convert_evf
  result = convert_fn(state_dict, config, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  del state_dict

  weight_files = sorted(f for f in os.listdir(src_dir)
                        if f in WEIGHT_FILES or re.fullmatch(r"(model|pytorch_model)-.*\.(safetensors|bin)", f))
  provenance = {
      "source": src, "family": family, "source_dir": os.path.abspath(src_dir),
      "source_files": {f: sha256_file(os.path.join(src_dir, f)) for f in weight_files + ["config.json"]},
      "converter": {"evf_jax": __version__, "rules_version": RULES_VERSION},
      "dtype": dtype, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "num_tensors": len(result.mapping),
  }

  def write(staging: str) -> None:
    tokenizer_files = {n: os.path.join(src_dir, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))}
    save_model(staging, result.params, {**config.to_dict(), PARAM_DTYPE_KEY: dtype}, provenance, tokenizer_files)

  write_directory(out, write)
  log(f"wrote {out}")
  return provenance
