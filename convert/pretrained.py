"""An EVF-SAM parameter tree for training, started from the public SAM and BEiT-3 checkpoints.

What the original EVF-SAM training starts from (hustvl/EVF-SAM, `model/evf_sam.py`):
  - SAM from the official segment-anything file (`sam_vit_h_4b8939.pth`), loaded strictly;
  - BEiT-3 from the public pretrained file (`beit3_large_patch16_224.pth`, or the base one), whose
    "model" entry is loaded with `strict=False` into a `BEiT3Wrapper` (unilm `beit3/modeling_utils.py`),
    a module whose only child is the torchscale encoder, attribute `beit3`;
  - the projector `text_hidden_fcs` (our `projector/fc1`, `projector/fc2`) freshly initialised.

`init_from_pretrained` does the same: the parameter tree of `evf_jax.evf.init_params(config, rng)` with
the `sam` subtree replaced by the converted SAM file and the `beit3` subtree by the converted BEiT-3 file.
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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert import beit3 as beit3_conv
from convert.evf import sha256_file
from convert import sam as sam_conv
from convert.io import load_state_dict
from convert.rules import ConversionError, flatten
from evf_jax import runtime
from evf_jax.beit3.config import Beit3Config
from evf_jax.evf import EvfConfig, init_params
from evf_jax.sam.config import SAM_CONFIGS, SamConfig

SAM_PREFIXES = ("", "visual_model.")   # official segment-anything file; EVF-SAM checkpoint
SUBTREES = ("sam", "beit3", "projector")


class CheckpointSizeError(ConversionError):
  """A checkpoint of another size than the config asks for (one line naming both)."""


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

def _sam_dims(state_dict: Mapping[str, Any], prefix: str) -> tuple[int, int]:
  """(embed width, depth) of the image encoder under `prefix`."""
  width = int(np.shape(state_dict[prefix + "image_encoder.patch_embed.proj.weight"])[0])
  rx = re.compile(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.")
  depth = len({m.group(1) for k in state_dict if (m := rx.match(k))})
  return width, depth


def _sam_name(width: int, depth: int) -> str | None:
  return next((n for n, c in SAM_CONFIGS.items() if (c.embed_dim, c.depth) == (width, depth)), None)


def _sam_label(name: str | None, width: int, depth: int) -> str:
  return (f"sam_{name}" if name else "SAM") + f" (image encoder width {width}, depth {depth})"


def detect_sam_prefix(state_dict: Mapping[str, Any], path: str = "SAM checkpoint") -> str:
  found = [p for p in SAM_PREFIXES if p + "image_encoder.patch_embed.proj.weight" in state_dict]
  if len(found) != 1:
    raise ConversionError([f"expected one SAM image encoder ('image_encoder.patch_embed.proj.weight' "
                           f"under one of {list(SAM_PREFIXES)}), found {len(found)}"
                           + ("" if found else ": not a SAM checkpoint")], what=path)
  return found[0]


def check_sam_size(state_dict: Mapping[str, Any], config: EvfConfig, prefix: str, path: str) -> str:
  """The SAM size of the tensors (a name of SAM_CONFIGS); a one-line error if it is not `config.sam`'s."""
  want: SamConfig = config.sam
  width, depth = _sam_dims(state_dict, prefix)
  got = _sam_name(width, depth)
  if (width, depth) != (want.embed_dim, want.depth):
    problem = (f"{_sam_label(got, width, depth)} checkpoint given for sam_scale={config.sam_scale}, "
               f"which needs {_sam_label(want.name, want.embed_dim, want.depth)}")
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


def check_beit3_size(state_dict: Mapping[str, Any], config: EvfConfig, prefix: str, path: str) -> str:
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


def _convert_sam(state_dict, config: EvfConfig, path: str, param_dtype):
  prefix = detect_sam_prefix(state_dict, path)
  size = check_sam_size(state_dict, config, prefix, path)
  convert = functools.partial(sam_conv.convert_sam_result, config=config.sam)
  result, skipped = _convert_under(convert, state_dict, prefix, param_dtype, f"SAM checkpoint {path}")
  return result, prefix, size, skipped


def _convert_beit3(state_dict, config: EvfConfig, path: str, param_dtype):
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
def _subtree_init(config: EvfConfig, names: tuple[str, ...], param_dtype):
  # Outputs only `names`: XLA removes every other initialiser (and the forward pass `init` traces).
  return runtime.jit_init(lambda r: {k: init_params(config, r, param_dtype=param_dtype)[k] for k in names})


def random_subtrees(config: EvfConfig, rng, subtrees: Sequence[str],
                    param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """`{name: init_params(config, rng, param_dtype)[name]}` for `subtrees`, computing only those."""
  unknown = sorted(set(subtrees) - set(SUBTREES))
  if unknown:
    raise ValueError(f"unknown subtrees {unknown}; the parameter tree has {list(SUBTREES)}")
  names = tuple(n for n in SUBTREES if n in subtrees)
  if not names:
    return {}
  if names == SUBTREES:
    return dict(init_params(config, rng, param_dtype=param_dtype))
  return dict(_subtree_init(config, names, param_dtype)(rng))


def init_from_pretrained(config: EvfConfig, *, sam_path: str | None, beit3_path: str | None,
                         rng, param_dtype: Any = jnp.float32) -> tuple[dict[str, Any], InitReport]:
  """EVF-SAM params as the original training starts: SAM and BEiT-3 from their public checkpoints, the
  projector (and any subtree whose path is None) at `init_params(config, rng, param_dtype)`'s init.

  Args:
    config: the model; its sizes must be the checkpoints' sizes.
    sam_path: an official `sam_vit_*.pth` (or an EVF-SAM checkpoint: SAM under `visual_model.`); None:
      SAM stays random.
    beit3_path: a `beit3_*_patch16_224.pth` ({"model": {"beit3.*": ...}}), a bare torchscale BEiT-3 state
      dict, or an EVF-SAM checkpoint (`mm_extractor.beit3.*`); None: BEiT-3 stays random.
    rng: a jax PRNG key for the random part.
    param_dtype: dtype of every parameter (default float32).

  Returns:
    (params, report): params has exactly the tree of `evf_jax.evf.abstract_params(config, param_dtype)`.

  Raises:
    CheckpointReadError: a file is missing or unreadable.
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
  for name, tree in loaded.items():
    params[name] = jax.tree.map(jnp.asarray, tree)
  params = {n: params[n] for n in SUBTREES}
  random_paths = tuple(sorted(f"{n}/{p}" for n in random_names for p in flatten(params[n])))
  return params, InitReport(sources=sources, random_subtrees=random_names, random_init=random_paths)
