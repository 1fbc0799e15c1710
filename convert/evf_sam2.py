"""EVF-SAM2 state dicts -> params of `evf_jax.evf_sam2.EvfSam2`.

The keys are EVF-SAM's (`convert.evf`) with SAM-2 under `visual_model.`: BEiT-3 (`mm_extractor.beit3.*`) and
the projector (`text_hidden_fcs.0.{0,2}.*`) use EVF-SAM's rules, SAM-2 uses `convert.sam2`'s table (image path
and video memory; EVF's `memory_encoder.fuser.layers.N.weight` is the renamed `gamma`). Whether a checkpoint is EVF-SAM or EVF-SAM2 shows in its keys:
`visual_model.image_encoder.trunk.*` (SAM-2) vs `visual_model.image_encoder.blocks.*` (SAM-1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert import beit3 as beit3_conv
from convert import sam2 as sam2_conv
from convert.evf import BEIT3_PREFIX, SAM_PREFIX, _prefixed, evf_rules
from convert.rules import ConversionResult, Rule, convert
from evf_jax.evf_sam2 import EvfSam2Config, abstract_params


def is_evf_sam2(state_dict: Mapping[str, Any]) -> bool:
  """True for EVF-SAM2's key layout (a Hiera trunk under `visual_model.`)."""
  return any(k.startswith(SAM_PREFIX + "image_encoder.trunk.") for k in state_dict)


def evf_sam2_rules() -> list[Rule]:
  """EVF-SAM's table with its SAM rules replaced by SAM-2's (the fuser's layer scale written back as EVF's
  `weight`)."""
  sam = re.escape(SAM_PREFIX)
  return [*_prefixed(sam2_conv.sam2_rules(layer_scale="weight"), SAM_PREFIX, "sam/"),
          *(r for r in evf_rules() if not r.pattern.startswith(sam))]


def convert_evf_sam2(state_dict: Mapping[str, np.ndarray], config: EvfSam2Config,
                     dtype: Any = None) -> ConversionResult:
  """Every tensor of an EVF-SAM2 state dict onto `EvfSam2(config)`'s params; strict, one error for all
  problems."""
  ignore = [re.escape(BEIT3_PREFIX) + p for p in beit3_conv.IGNORE]
  what = (f"EVF-SAM2 checkpoint (sam_scale={config.sam_scale}, "
          f"mm_extractor_scale={config.mm_extractor_scale})")
  sam2_conv.refuse_sam21(state_dict, SAM_PREFIX, what=what)  # an EVF model built on SAM 2.1: one line
  return convert(state_dict, evf_sam2_rules(), abstract_params(config), ignore=ignore, dtype=dtype, what=what)
