"""The training configuration: every field with its default (`base_config`), and helpers for config files.

A config file (configs/train/NAME.py) defines `get_config(arg)`, starts from `base_config()` and overrides
fields; `run.py train --config configs/train/NAME.py:key=value,... --config.field=value` reads it through
ml_collections' config_flags with the config locked (an unknown field is an error). Sequences are tuples, so
the command line can override them: `--config.mesh="(('data', 2), ('fsdp', 4), ('tensor', 1))"`.
"""

from __future__ import annotations

import dataclasses
import traceback
import types
from typing import Any, Optional

import ml_collections

from evf_jax import families, sharding
from evf_jax.beit3.config import Beit3Config
from evf_jax.errors import UserError, first_line
from evf_jax.evf import EvfConfig
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.families import ModelConfig
from evf_jax.sam.config import SamConfig
from evf_jax.sam2.config import Sam2Config

# EVF-SAM (SAM-1) trains all of BEiT-3, the projector, SAM's mask decoder and, of the prompt encoder, only
# `no_mask_embed`; SAM's image encoder stays frozen. EVF-SAM2 keeps all of SAM-2 frozen, so that its video
# ability is kept (docs/data.md#7-training-recipe).
EVF_SAM_TRAINABLE = ("beit3/.*", "projector/.*", "sam/mask_decoder/.*", "sam/prompt_encoder/no_mask_embed")
EVF_SAM2_TRAINABLE = ("beit3/.*", "projector/.*")
# Everything EVF-SAM2's image model uses (training from scratch); SAM-2's video parts (memory, object pointers)
# are not on that path.
EVF_SAM2_IMAGE_PATH = ("beit3/.*", "projector/.*", "sam/image_encoder/.*", "sam/sam_mask_decoder/.*",
                       "sam/sam_prompt_encoder/no_mask_embed", "sam/no_mem_embed")


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """"size=base,refclef" -> {size: "base", refclef: True} over `defaults` (values keep the defaults' types)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise UserError(f"config argument {key!r}: expected one of {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise UserError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise UserError(f"config argument {key}={value}: expected true or false")
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise UserError(f"config argument {key}={value}: expected {type(default).__name__}") from None
  return ml_collections.ConfigDict(out)


def load_file(spec: str, flag: str = "--config") -> ml_collections.ConfigDict:
  """`configs/train/NAME.py[:arg]` -> its `get_config(arg)`, unlocked (`run.py train --config` and
  `run.py synthetic --config` read files with it). Everything that can be wrong with the file, or raised by it,
  is a one-line UserError naming the file: its text would otherwise surface as a traceback or as an unrelated
  complaint about config fields."""
  path, colon, arg = spec.partition(":")
  if not path:
    raise UserError(f"{flag} is empty: e.g. {flag} configs/train/synthetic.py")
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    raise UserError(f"{flag}: {e}") from None  # "[Errno 2] No such file or directory: 'PATH'"
  where = f"{flag} {path}"
  if not path.endswith(".py"):
    raise UserError(f"{where}: not a Python file; a training config is a .py file that defines get_config() "
                    "(configs/train/*.py)")
  try:
    code = compile(source, path, "exec", dont_inherit=True)  # not with this module's __future__ flags
  except (SyntaxError, ValueError) as e:  # IndentationError too; null bytes (a binary file) have no line
    if isinstance(e, SyntaxError) and e.lineno:
      raise UserError(f"{where}: line {e.lineno}: {type(e).__name__}: {e.msg}") from None
    raise UserError(f"{where}: not Python source ({e.msg if isinstance(e, SyntaxError) else first_line(e)})") from None
  module = types.ModuleType("evf_jax_train_config")
  module.__file__ = path
  try:
    exec(code, module.__dict__)
  except Exception as e:  # anything the file raises is the file's problem, not ours
    line = _line_in(e, path)
    raise UserError(f"{where}: {f'line {line}: ' if line else ''}{type(e).__name__}: {first_line(e)}") from None
  get_config = module.__dict__.get("get_config")
  if not callable(get_config):
    raise UserError(f"{where}: defines no get_config() (see configs/train/*.py)")
  where = f"{flag} {spec}"
  try:
    cfg = get_config(*((arg,) if colon else ()))  # "NAME.py:" passes "", as ml_collections' config_flags does
  except (UserError, ValueError) as e:  # a bad argument (parse_arg, released_preset): the message says which
    raise UserError(f"{where}: {first_line(e)}") from None
  except Exception as e:
    line = _line_in(e, path)
    raise UserError(f"{where}: get_config() raised {type(e).__name__}{f' at line {line}' if line else ''}: "
                    f"{first_line(e)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"{where}: get_config() returned {type(cfg).__name__}, not an ml_collections.ConfigDict "
                    "(start from evf_jax.train.config.base_config())")
  return cfg


def _line_in(e: BaseException, path: str) -> Optional[int]:
  """The line of `path` that raised `e` (its innermost frame in that file), if any."""
  lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
  return lines[-1] if lines else None


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Run length and cadence (in optimizer steps).
  c.seed = 0
  c.total_steps = 5000          # LISA: 10 epochs x 500 steps
  c.batch_size = 160            # images per step over all devices, each with up to data.num_prompts prompts
  c.grad_accum = 1              # microbatches per step (batch_size / grad_accum images at a time)
  c.checkpoint_every = 500
  c.eval_every = 500
  c.log_every = 50
  c.keep_checkpoints = 3        # the latest N, plus the best by eval gIoU
  c.export_best = False         # export/ holds the best step by eval gIoU (LISA keeps that), not the last
  c.progress = True
  # Compute.
  c.precision = "bf16"          # compute dtype; parameters and optimizer state are float32
  c.attention = "xla"           # or "cudnn" on NVIDIA GPUs (bf16/fp16)
  c.remat = False               # recompute activations of SAM / BEiT-3 blocks in the backward pass
  c.peak_tflops = 0.0           # per device, for MFU; 0: from the device kind (evf_jax/flops.py)
  # Model: every field of SAM (EVF-SAM) or SAM-2 (EVF-SAM2) and of BEiT-3 (`model_fields`), so any of them can
  # be overridden.
  c.model = model_fields("evf-sam")
  # Where the parameters start: a converted EVF-SAM / EVF-SAM2 checkpoint (fine-tuning), or the public SAM
  # (sam_vit_{b,l,h}_*.pth; EVF-SAM2: SAM-2's sam2_hiera_*.pt) and BEiT-3 (beit3_{base,large}_patch16_224.pth)
  # files, or random (from_scratch).
  c.init = ml_collections.ConfigDict({"evf_checkpoint": "", "sam_checkpoint": "", "beit3_checkpoint": "",
                                      "from_scratch": False})
  c.tokenizer = ""              # a sentencepiece model (file or directory); "": the init checkpoint's
  c.train_tokenizer_vocab = 0   # > 0: train a sentencepiece model of this many pieces on the training prompts
  c.trainable = EVF_SAM_TRAINABLE  # regexes over parameter paths; the rest is frozen
  # LISA's recipe where EVF-SAM's is unknown (docs/data.md#7-training-recipe).
  # "muon": Muon on the dense weight matrices, AdamW (these betas) on the rest; lr applies to both.
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "lr": 3e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 100,
      "schedule": "linear", "end_factor": 0.0, "clip_norm": 1.0, "muon_momentum": 0.95})
  # Each loss term is a mean over the valid masks of a group of images_per_group images, then a mean over the
  # groups: the original's mean over its per-device micro-batch of 2 images (LISA's), under DeepSpeed's average
  # over devices and accumulation steps. 0: one mean over the masks of the whole microbatch.
  c.loss = ml_collections.ConfigDict({"bce_weight": 2.0, "dice_weight": 0.5, "images_per_group": 2})
  # Data: TFDS datasets (run.py prepare) in the data_dir data.root, mixed by group weight
  # (docs/data.md#6-training-mixture).
  c.data = ml_collections.ConfigDict({
      "root": "data",
      "mixture": {"refer_seg": (1.0, ("refcoco", "refcoco+", "refcocog"))},
      "split": "train",          # read from every dataset; a TFDS slice works too: "train[:10%]"
      "num_prompts": 3,          # K prompts per image (fewer when an image has fewer)
      "max_text_len": 64,        # tokens per prompt, <s> and </s> included (BEiT-3's fine-tuning default)
      "mask_size": 0,            # loss resolution in the SAM frame; 0: SAM's input size
      "workers": 0,              # grain worker processes (0: threads in this process)
      "read_threads": 4,
      "cache_images": False,     # keep each image's decoded, resized inputs in memory (small datasets only)
      "prefetch": 8,
      "synthetic": {"num_train": 0, "num_eval": 0, "seed": 0},  # > 0: generate a missing synthetic dataset
  })
  c.evals = ("refcoco|unc|val",)  # splits evaluated every eval_every steps; the first one picks the best
  # root "": data.root; size_multiple / min_prompts: the evaluator's shape buckets (evf_jax/evaluate.py);
  # precision "": the training's, or fp32 / bf16 / fp16 (the original's eval.py runs fp16; fp32 runs XLA
  # attention: cuDNN's needs bf16 or fp16)
  c.eval = ml_collections.ConfigDict({"root": "", "batch_size": 8, "size_multiple": 128, "min_prompts": 2,
                                      "precision": ""})
  # Devices: mesh axes (-1: the rest) and logical-axis rules (evf_jax/sharding.py).
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  # Over several TPU slices (multi-slice): how many slices each mesh axis spans (-1: the rest); the mesh's
  # sizes above are the whole job's. One slice, CPUs and GPUs ignore it.
  c.dcn_mesh = sharding.DEFAULT_DCN_MESH
  c.sharding_rules = sharding.DEFAULT_RULES
  # True: every device holds the frozen parameters whole (SAM's encoder: 2.4 GiB in float32 at the released
  # size), so FSDP does not gather them in every step; False: they are sharded by the rules like the rest.
  c.replicate_frozen = False
  return c


def _preset(name: str) -> ModelConfig:
  errors = []
  for family in families.FAMILIES:
    try:
      return family.config_class.preset(name)
    except ValueError as e:
      errors.append(str(e))
  raise UserError(f"model preset: {'; '.join(errors)}")


def model_fields(preset: str, **overrides: dict) -> ml_collections.ConfigDict:
  """The config's `model` section for a preset of either family (EVF-SAM: "evf-sam", "base", "tiny", ...;
  EVF-SAM2: "evf-sam2", "toy"): the size labels and every field of its SAM part (`sam`, or `sam2` for EVF-SAM2)
  and of BEiT-3, with `sam={...}` / `sam2={...}` / `beit3={...}` overriding some of them. Which of `sam` and
  `sam2` the section holds says which family it describes."""
  base = _preset(preset)
  sam_part = "sam2" if isinstance(base, EvfSam2Config) else "sam"
  extra = sorted(set(overrides) - {sam_part, "beit3"})
  if extra:
    raise UserError(f"model preset {preset!r} has no part {extra[0]!r} (its parts: {sam_part}, beit3)")
  out = {"sam_scale": base.sam_scale, "mm_extractor_scale": base.mm_extractor_scale}
  if isinstance(base, EvfSam2Config):
    out["multimask_output"] = base.multimask_output  # how images are decoded after training (evf_sam2.py)
  for part in (sam_part, "beit3"):
    fields = dataclasses.asdict(getattr(base, part))
    unknown = sorted(set(overrides.get(part, {})) - set(fields))
    if unknown:
      raise UserError(f"model.{part}: unknown field(s) {unknown}")
    fields.update(overrides.get(part, {}))
    out[part] = fields
  return ml_collections.ConfigDict(out)


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The EvfConfig or EvfSam2Config the config's `model` section describes (UserError for an invalid one)."""
  try:
    beit3 = Beit3Config(**model.beit3.to_dict())
    if "sam2" in model:
      return EvfSam2Config(sam2=Sam2Config(**model.sam2.to_dict()), beit3=beit3, sam_scale=model.sam_scale,
                           mm_extractor_scale=model.mm_extractor_scale, multimask_output=model.multimask_output)
    return EvfConfig(sam=SamConfig(**model.sam.to_dict()), beit3=beit3, sam_scale=model.sam_scale,
                     mm_extractor_scale=model.mm_extractor_scale)
  except (TypeError, ValueError) as e:
    raise UserError(f"config.model: {e}") from None


def eval_compute(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
  """The periodic evaluation's precision and attention: `eval.precision` ("": the training's); fp32 runs XLA
  attention, since cuDNN's needs bf16 or fp16."""
  precision = cfg.eval.get("precision", "") or cfg.precision
  return precision, cfg.attention if precision != "fp32" else "xla"


def default_trainable(model: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What the original trains in the family the config's `model` section describes."""
  return EVF_SAM2_TRAINABLE if "sam2" in model else EVF_SAM_TRAINABLE


def use_model(c: ml_collections.ConfigDict, preset: str) -> None:
  """Sets the config's model to a preset and `trainable` to what the original trains in its family."""
  c.model = model_fields(preset)
  c.trainable = default_trainable(c.model)


def released_preset(size: str, sam2: bool, multitask: bool = False) -> str:
  """The model preset of configs/train/{refcoco,multitask}.py's `size=huge|base` and `sam2` arguments."""
  if sam2:
    if size != "huge":
      raise ValueError(f"size={size} with sam2: EVF-SAM2 comes in one size (SAM-2 Hiera-L + BEiT-3-large)")
    return "evf-sam2-multitask" if multitask else "evf-sam2"
  if size not in ("huge", "base"):
    raise ValueError(f"size={size}: expected huge or base")
  return ("evf-sam-multitask" if multitask else "evf-sam") if size == "huge" else "base"
