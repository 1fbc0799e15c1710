"""An EVF-SAM or EVF-SAM2 parameter tree for training, started from the public SAM (SAM-2) and BEiT-3
checkpoints.

What the original EVF-SAM training starts from (hustvl/EVF-SAM, `model/evf_sam.py`):
  - SAM from the official segment-anything file (`sam_vit_h_4b8939.pth`), loaded strictly;
  - BEiT-3 from the public pretrained file (`beit3_large_patch16_224.pth`, or the base one), whose
    "model" entry is loaded with `strict=False` into a `BEiT3Wrapper` (unilm `beit3/modeling_utils.py`),
    a module whose only child is the torchscale encoder, attribute `beit3`;
  - the projector `text_hidden_fcs` (our `projector/fc1`, `projector/fc2`) freshly initialised: torch
    `nn.Linear`'s default, weights and biases uniform in +-1/sqrt(fan_in) (flax's lecun_normal has sqrt(3) times
    the spread, and zero biases).

EVF-SAM2 (`model/evf_sam2.py`) starts the same way with SAM-2 in SAM's place: Meta's `build_sam2` with
`sam2_hiera_l.yaml` (sam_scale "large"; `sam2_hiera_t.yaml` for "tiny") and the official SAM 2.0 file
(`sam2_hiera_large.pt`), which it loads strictly.

`init_from_pretrained` does the same: the parameter tree of the family's `init_params(config, rng)` (an
`EvfConfig` or an `EvfSam2Config`) with the `sam` subtree replaced by the converted SAM (SAM-2) file, the
`beit3` subtree by the converted BEiT-3 file, and the projector drawn as torch's `nn.Linear` draws it
(`torch_linear_init`).
Either path may be None; that subtree then stays at its random init (a partial init). Only the subtrees
that stay random are initialised: `init_params` is traced inside a jit whose outputs are those subtrees,
so XLA drops the other initialisers and the result is bit-identical to `init_params(config, rng)` there.
Compiling every initialiser is what makes `init_params` slow (minutes at full size; ~40 s on 2 CPU cores
even at the tiny size, SAM's being most of it); the projector's alone compile in about 2 s.

Layout of the public checkpoint files, as far as the public code and threads show it:

SAM (`sam_vit_{b,l,h}_*.pth`): the plain state dict of segment-anything's `Sam`, keys `image_encoder.*`,
`prompt_encoder.*`, `mask_decoder.*`; `pixel_mean` / `pixel_std` are non-persistent buffers, not in the
file. Loaded strictly: every tensor must be converted and every SAM parameter filled. An EVF-SAM
checkpoint, with SAM under `visual_model.`, is accepted too; its other keys are skipped and listed.

SAM-2 (`sam2_hiera_{tiny,small,base_plus,large}.pt`): `{"model": state dict of SAM2Base}` (Meta's
`build_sam._load_checkpoint` takes `["model"]` and loads it strictly), keys `image_encoder.trunk.*`,
`image_encoder.neck.*`, `sam_prompt_encoder.*`, `sam_mask_decoder.*`, the video memory (`memory_attention.*`,
`memory_encoder.*`, `maskmem_tpos_enc`, ...) and `no_mem_embed`; converted with `convert.sam2`, strictly, into
the whole `sam` subtree. The size is told by the trunk's width and depth (Hiera-T and -S share a width). A SAM
2.1 file (`sam2.1_hiera_*.pt`: `no_obj_embed_spatial`, `obj_ptr_tpos_proj.*`) is refused: EVF-SAM2 builds on
SAM 2.0. An EVF-SAM2 checkpoint (SAM-2 under `visual_model.`) is accepted too. A file of the other SAM
generation than the config's fails in one line.

BEiT-3 (`beit3_{base,large}[_itc|_indomain]_patch16_224.pth`), sources: microsoft/unilm
`beit3/modeling_utils.py`, `beit3/modeling_finetune.py`, `beit3/utils.py`, `beit3/README.md`, unilm
issue #1078, torchscale issue #29:
  - the file is a dict whose "model" entry is the state dict (`load_model_and_may_interpolate` looks the
    state dict up under "model" or "module"; EVF-SAM takes `["model"]`); `convert.io.load_state_dict`
    unwraps it;
  - the encoder is under `beit3.` (the wrapper's attribute): `beit3.text_embed.weight`,
    `beit3.vision_embed.{proj.weight, proj.bias, cls_token, mask_token}`,
    `beit3.encoder.embed_positions.{A,B}.weight`, `beit3.encoder.layers.<i>.*` and
    `beit3.encoder.layer_norm.{A,B}.*`. It is built with `no_output_layer=True` and no relative position
    buckets, so there is no `encoder.output_projection` and no relative-position table or index (the
    `relative_position_index` that unilm's `load_state_dict` ignores when missing is a BEiT v1/v2
    leftover). `vision_embed.mask_token` is a real encoder parameter (used only in masked pretraining);
    we convert it like the original loads it;
  - outside `beit3.` are the pretraining heads, which the non-strict load skips. A unilm maintainer names
    `mim_head.weight` / `mim_head.bias` as stored in the base and large files (issue #1078; torchscale
    issue #29: language and image modelling use separate heads). The README's parameter counts (base
    276M, large 746M) are the torchscale encoder (221.0M, 672.7M, counted from torchscale) plus exactly
    one Linear(D, 64010) and one Linear(D, 8192) with biases: a masked-language head over the
    64010-token vocabulary (called `mlm_head` by a third-party loader of these files; the unilm code
    does not name it, the pretraining code was never released) and the masked-image head over the
    8192 visual tokens. We have not opened the real files: names beyond `mim_head` are inferred;
  - by the same counting the `_itc` files (222M / 674M) hold the encoder plus two Linear(D, D) without
    bias and a scalar, i.e. the `vision_head.weight`, `language_head.weight` and `logit_scale` of the
    retrieval model in `modeling_finetune.py`; fine-tuned task files add `head.*`, `fc_norm.*` or
    `pooler.*`. Whatever lies outside `beit3.` is skipped and listed here;
  - the vision position table `beit3.encoder.embed_positions.A.weight` has 2 + 1 + (224/16)^2 = 199
    rows; unilm interpolates it only when fine-tuning at another resolution, EVF-SAM never does (224).

Strictness: under the encoder's prefix every key must be converted and every parameter filled (one
`ConversionError` lists every problem), where the original's non-strict load would silently leave a
missing tensor random or drop an unknown one. Keys outside the prefix are skipped and listed in the
report. A checkpoint of another size fails first, in one line naming both sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert import beit3 as beit3_conv
from convert.evf import sha256_file
from convert import sam as sam_conv
from convert import sam2 as sam2_conv
from convert.io import load_state_dict
from convert.rules import ConversionError, ConversionResult, flatten
from evf_jax import runtime
from evf_jax.beit3.config import Beit3Config
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.families import ModelConfig, family_of
from evf_jax.sam.config import SAM_CONFIGS
from evf_jax.sam2.config import SAM2_CONFIGS

SAM_PREFIXES = ("", "visual_model.")   # the official file; an EVF-SAM / EVF-SAM2 checkpoint
SUBTREES = ("sam", "beit3", "projector")


class CheckpointSizeError(ConversionError):
  """A checkpoint of another size than the config asks for (one line naming both)."""


class CheckpointKindError(ConversionError):
  """A SAM checkpoint of the other generation than the config's (one line naming both)."""


@dataclasses.dataclass(frozen=True)
class SamKind:
  """One SAM generation: how its checkpoints are laid out and named, and how they convert."""
  name: str                 # "SAM" / "SAM-2"
  model: str                # the EVF family built on it
  files: str                # the public files, for messages
  encoder: str              # key prefix of the image encoder's patch embedding and blocks
  part: str                 # what `encoder` is called in messages
  stem: str                 # a known size's label: stem + preset name ("sam_vit_h", "sam2_hiera_l")
  configs: Mapping[str, Any] = dataclasses.field(repr=False)   # the size presets
  field: str                # the EVF config's field holding the SAM config
  convert: Callable[..., ConversionResult]             # (state_dict, config, prefix=, dtype=)
  check_version: Callable[..., None] | None = None     # (state_dict, prefix, what=): refuses a file early

  @property
  def patch_key(self) -> str:
    return self.encoder + "patch_embed.proj.weight"


SAM1 = SamKind("SAM", "EVF-SAM", "segment-anything's sam_vit_*.pth", "image_encoder.", "image encoder", "sam_",
               SAM_CONFIGS, "sam", sam_conv.convert_sam_result)
SAM2 = SamKind("SAM-2", "EVF-SAM2", "Meta's sam2_hiera_*.pt", "image_encoder.trunk.", "Hiera trunk", "sam2_",
               SAM2_CONFIGS, "sam2", sam2_conv.convert_sam2_result, sam2_conv.refuse_sam21)
SAM_KINDS = (SAM1, SAM2)


def sam_kind(config: ModelConfig) -> SamKind:
  return SAM2 if isinstance(config, EvfSam2Config) else SAM1


@dataclasses.dataclass(frozen=True)
class LoadedSource:
  """Where one subtree of the parameters came from."""
  subtree: str                 # "sam" or "beit3"
  path: str
  sha256: str
  prefix: str                  # where in the file the subtree's tensors are ("", "beit3.", ...)
  size: str                    # the size the tensors have ("vit_h", "large", "tiny", ...)
  converted: int               # source tensors converted
  skipped: tuple[str, ...]     # source keys outside `prefix`, not used (pretraining heads, ...)


@dataclasses.dataclass(frozen=True)
class InitReport:
  sources: dict[str, LoadedSource]    # subtree -> the file it came from
  random_subtrees: tuple[str, ...]    # subtrees left at `init_params`' random init
  random_init: tuple[str, ...]        # their parameter paths, '/'-joined (e.g. "projector/fc1/kernel")

  @property
  def skipped_keys(self) -> tuple[str, ...]:
    """Every source key skipped, over all files."""
    return tuple(sorted({k for s in self.sources.values() for k in s.skipped}))

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready (provenance of a training run)."""
    return {"sources": {k: dataclasses.asdict(v) | {"skipped": list(v.skipped)}
                        for k, v in self.sources.items()},
            "random_subtrees": list(self.random_subtrees), "random_init": list(self.random_init)}

  def summary(self) -> str:
    lines = []
    for name in SUBTREES:
      if name in self.sources:
        s = self.sources[name]
        lines.append(f"{name}: {s.converted} tensors from {s.path} ({s.size}, sha256 {s.sha256[:12]}…"
                     + (f", under {s.prefix!r}" if s.prefix else "") + ")")
        if s.skipped:
          shown = ", ".join(s.skipped[:8]) + (f", … ({len(s.skipped)} in all)" if len(s.skipped) > 8 else "")
          lines.append(f"  skipped (not part of {name}): {shown}")
      elif name in self.random_subtrees:
        n = sum(1 for p in self.random_init if p.startswith(name + "/"))
        lines.append(f"{name}: random init ({n} tensors)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sizes

def _sam_dims(state_dict: Mapping[str, Any], prefix: str, kind: SamKind) -> tuple[int, int]:
  """(embed width, depth) of the image encoder (SAM-2: the Hiera trunk) under `prefix`."""
  width = int(np.shape(state_dict[prefix + kind.patch_key])[0])
  rx = re.compile(re.escape(prefix + kind.encoder) + r"blocks\.(\d+)\.")
  depth = len({m.group(1) for k in state_dict if (m := rx.match(k))})
  return width, depth


def _sam_name(width: int, depth: int, kind: SamKind) -> str | None:
  return next((n for n, c in kind.configs.items() if (c.embed_dim, c.depth) == (width, depth)), None)


def _sam_label(name: str | None, width: int, depth: int, kind: SamKind) -> str:
  return (f"{kind.stem}{name}" if name else kind.name) + f" ({kind.part} width {width}, depth {depth})"


def detect_sam_prefix(state_dict: Mapping[str, Any], path: str = "SAM checkpoint", kind: SamKind = SAM1) -> str:
  """Where `kind`'s tensors are in the file; a one-line error for the other generation's file."""
  found = [p for p in SAM_PREFIXES if p + kind.patch_key in state_dict]
  if len(found) == 1:
    return found[0]
  other = [k for k in SAM_KINDS if k is not kind and any(p + k.patch_key in state_dict for p in SAM_PREFIXES)]
  if other and not found:
    raise CheckpointKindError([f"a {other[0].name} checkpoint ({other[0].files}) given for {kind.model}, which "
                               f"needs {kind.name} ({kind.files})"], what=path)
  raise ConversionError([f"expected one {kind.name} image encoder ({kind.patch_key!r} under one of "
                         f"{list(SAM_PREFIXES)}), found {len(found)}"
                         + ("" if found else f": not a {kind.name} checkpoint")], what=path)


def check_sam_size(state_dict: Mapping[str, Any], config: ModelConfig, prefix: str, path: str) -> str:
  """The size of the tensors (a preset name of the config's SAM generation); a one-line error if it is not
  the config's."""
  kind = sam_kind(config)
  want = getattr(config, kind.field)
  width, depth = _sam_dims(state_dict, prefix, kind)
  got = _sam_name(width, depth, kind)
  if (width, depth) != (want.embed_dim, want.depth):
    problem = (f"{_sam_label(got, width, depth, kind)} checkpoint given for sam_scale={config.sam_scale}, "
               f"which needs {_sam_label(want.name, want.embed_dim, want.depth, kind)}")
    raise CheckpointSizeError([problem], what=path)
  return got or want.name


def _beit3_dims(state_dict: Mapping[str, Any], prefix: str) -> tuple[int, int]:
  width = int(np.shape(state_dict[prefix + "text_embed.weight"])[1])
  rx = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  depth = len({m.group(1) for k in state_dict if (m := rx.match(k))})
  return width, depth


def _beit3_label(width: int, depth: int) -> str:
  name = next((n for n in ("tiny", "base", "large")
               if (Beit3Config.preset(n).embed_dim, Beit3Config.preset(n).num_layers) == (width, depth)),
              None)
  return (f"BEiT-3 {name}" if name else "BEiT-3") + f" (width {width}, {depth} layers)"


def check_beit3_size(state_dict: Mapping[str, Any], config: ModelConfig, prefix: str, path: str) -> str:
  want: Beit3Config = config.beit3
  width, depth = _beit3_dims(state_dict, prefix)
  if (width, depth) != (want.embed_dim, want.num_layers):
    problem = (f"{_beit3_label(width, depth)} checkpoint given for mm_extractor_scale="
               f"{config.mm_extractor_scale}, which needs {_beit3_label(want.embed_dim, want.num_layers)}")
    raise CheckpointSizeError([problem], what=path)
  return config.mm_extractor_scale


# ------------------------------------------------------------------------------------------ loading

def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file as a flat {key: numpy array} (`.pth` with a "model" wrapper unwrapped, or
  `.safetensors`); see `convert.io.load_state_dict`."""
  return load_state_dict(path)


def _convert_sam(state_dict, config: ModelConfig, path: str, param_dtype):
  kind = sam_kind(config)
  prefix = detect_sam_prefix(state_dict, path, kind)
  if kind.check_version is not None:
    kind.check_version(state_dict, prefix, what=path)
  size = check_sam_size(state_dict, config, prefix, path)
  convert = functools.partial(kind.convert, config=getattr(config, kind.field))
  result, skipped = _convert_under(convert, state_dict, prefix, param_dtype, f"{kind.name} checkpoint {path}")
  return result, prefix, size, skipped


def _convert_beit3(state_dict, config: ModelConfig, path: str, param_dtype):
  try:
    prefix = beit3_conv.detect_prefix(state_dict)
  except ConversionError as e:
    raise ConversionError(e.problems, what=f"BEiT-3 checkpoint {path}") from None
  size = check_beit3_size(state_dict, config, prefix, path)
  convert = functools.partial(beit3_conv.convert_beit3, config=config.beit3)
  result, skipped = _convert_under(convert, state_dict, prefix, param_dtype, f"BEiT-3 checkpoint {path}")
  return result, prefix, size, skipped


def _convert_under(convert, state_dict, prefix: str, param_dtype, what: str):
  """convert(state_dict, prefix=, dtype=) -> (result, the keys outside the prefix); a conversion
  error names the checkpoint and the prefix."""
  try:
    result = convert(state_dict, prefix=prefix, dtype=param_dtype)
  except ConversionError as e:
    raise ConversionError(e.problems, what=what + (f" (under {prefix!r})" if prefix else "")) from None
  skipped = tuple(sorted(k for k in state_dict if not k.startswith(prefix))) if prefix else ()
  return result, skipped


@functools.lru_cache(maxsize=8)
def _subtree_init(config: ModelConfig, names: tuple[str, ...], param_dtype):
  # Outputs only `names`: XLA removes every other initialiser (and the forward pass `init` traces).
  init_params = family_of(config).init_params
  return runtime.jit_init(lambda r: {k: init_params(config, r, param_dtype=param_dtype)[k] for k in names})


def random_subtrees(config: ModelConfig, rng, subtrees: Sequence[str],
                    param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """`{name: init_params(config, rng, param_dtype)[name]}` (the config's family's `init_params`) for
  `subtrees`, computing only those."""
  unknown = sorted(set(subtrees) - set(SUBTREES))
  if unknown:
    raise ValueError(f"unknown subtrees {unknown}; the parameter tree has {list(SUBTREES)}")
  names = tuple(n for n in SUBTREES if n in subtrees)
  if not names:
    return {}
  if names == SUBTREES:
    return dict(family_of(config).init_params(config, rng, param_dtype=param_dtype))
  return dict(_subtree_init(config, names, param_dtype)(rng))


PROJECTOR_STREAM = 7  # folded into the rng for the projector's draw: independent of the subtrees' init


def torch_linear_init(layers: Mapping[str, Any], rng) -> dict[str, Any]:
  """`{name: {"kernel": (in, out), "bias": (out,)}}` redrawn as torch's `nn.Linear` draws its parameters (kaiming
  uniform with a=sqrt(5) for the weight, and the bias): uniform in +-1/sqrt(in), dtypes kept."""
  out = {}
  for i, (name, layer) in enumerate(sorted(layers.items())):
    kernel, bias = layer["kernel"], layer["bias"]
    bound = 1.0 / np.sqrt(kernel.shape[0])
    k_rng, b_rng = jax.random.split(jax.random.fold_in(rng, i))
    out[name] = {"kernel": jax.random.uniform(k_rng, kernel.shape, kernel.dtype, -bound, bound),
                 "bias": jax.random.uniform(b_rng, bias.shape, bias.dtype, -bound, bound)}
  return out


def init_from_pretrained(config: ModelConfig, *, sam_path: str | None, beit3_path: str | None,
                         rng, param_dtype: Any = jnp.float32) -> tuple[dict[str, Any], InitReport]:
  """EVF-SAM / EVF-SAM2 params as the original training starts: SAM (SAM-2) and BEiT-3 from their public
  checkpoints, the projector at torch `nn.Linear`'s default init (`torch_linear_init`), any subtree whose path is
  None at the family's `init_params(config, rng, param_dtype)` init.

  Args:
    config: the model (`EvfConfig` or `EvfSam2Config`); its sizes must be the checkpoints' sizes.
    sam_path: EVF-SAM: an official `sam_vit_*.pth` (or an EVF-SAM checkpoint: SAM under `visual_model.`).
      EVF-SAM2: an official SAM 2.0 `sam2_hiera_*.pt` ({"model": state dict}, or the bare state dict; or an
      EVF-SAM2 checkpoint: SAM-2 under `visual_model.`). None: SAM stays random.
    beit3_path: a `beit3_*_patch16_224.pth` ({"model": {"beit3.*": ...}}), a bare torchscale BEiT-3 state
      dict, or an EVF-SAM / EVF-SAM2 checkpoint (`mm_extractor.beit3.*`); None: BEiT-3 stays random.
    rng: a jax PRNG key for the random part.
    param_dtype: dtype of every parameter (default float32).

  Returns:
    (params, report): params has exactly the tree of the family's `abstract_params(config, param_dtype)`.

  Raises:
    CheckpointReadError: a file is missing or unreadable.
    CheckpointKindError: a SAM file of the other generation (SAM-1 for EVF-SAM2, SAM-2 for EVF-SAM; one line).
    CheckpointSizeError: a checkpoint of another size (one line).
    ConversionError: listing every missing, unexpected or mis-shaped tensor of a file at once.
  """
  cache: dict[str, tuple[dict[str, np.ndarray], str]] = {}

  def read(path: str):
    key = os.path.realpath(path)
    if key not in cache:
      cache[key] = (read_checkpoint(path), sha256_file(path))
    return cache[key]

  loaded: dict[str, Any] = {}
  sources: dict[str, LoadedSource] = {}
  # Every file is read, size-checked and converted before anything is initialised: a wrong file fails
  # in seconds, not after minutes of random init.
  for name, path, conv in (("sam", sam_path, _convert_sam), ("beit3", beit3_path, _convert_beit3)):
    if path is None:
      continue
    state_dict, digest = read(path)
    result, prefix, size, skipped = conv(state_dict, config, path, param_dtype)
    loaded[name] = result.params
    sources[name] = LoadedSource(subtree=name, path=path, sha256=digest, prefix=prefix, size=size,
                                 converted=len(result.mapping), skipped=skipped)
  cache.clear()

  random_names = tuple(n for n in SUBTREES if n not in loaded)
  params = dict(random_subtrees(config, rng, random_names, param_dtype))
  if "projector" in params:  # the original's text_hidden_fcs keep torch's default init
    params["projector"] = torch_linear_init(params["projector"], jax.random.fold_in(rng, PROJECTOR_STREAM))
  for name, tree in loaded.items():
    params[name] = jax.tree.map(jnp.asarray, tree)
  params = {n: params[n] for n in SUBTREES}
  random_paths = tuple(sorted(f"{n}/{p}" for n in random_names for p in flatten(params[n])))
  return params, InitReport(sources=sources, random_subtrees=random_names, random_init=random_paths)
