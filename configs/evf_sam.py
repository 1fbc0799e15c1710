"""EVF-SAM model + inference settings as an ml_collections ConfigDict.

    from configs import evf_sam
    cfg = evf_sam.get_config("evf-sam")            # or "evf-sam-multitask", "base", "tiny"
    cfg.precision = "bf16"
    model_config = evf_sam.model_config(cfg)       # -> evf_jax.evf.EvfConfig

The architecture fields mirror a converted checkpoint's model_config.json; `model_config` rebuilds the
frozen dataclass (and so validates the fields).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("evf-sam", "evf-sam-multitask", "base", "tiny")


def get_config(arg: str = "evf-sam") -> ml_collections.ConfigDict:
  from evf_jax.evf import EvfConfig
  preset = arg or "evf-sam"
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  cfg.model = ml_collections.ConfigDict(EvfConfig.preset(preset).to_dict())
  cfg.precision = "fp32"          # fp32 | bf16 | fp16 (compute dtype; params keep their stored dtype)
  cfg.attention_impl = ""         # "" (XLA's choice) | "xla" | "cudnn" (flash attention on NVIDIA GPUs)
  cfg.max_text_length = 1022      # tokens incl. <s> and </s>; BEiT-3's limit, so nothing is cut
  cfg.size_multiple = 64          # postprocess shape bucket for original image sizes
  return cfg


def model_config(cfg: ml_collections.ConfigDict):
  from evf_jax.evf import EvfConfig
  return EvfConfig.from_dict(cfg.model.to_dict())
