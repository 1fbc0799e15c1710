"""BEiT-3 architecture hyper-parameters, as EVF-SAM builds them with torchscale.

EVF-SAM's `_get_base_config` / `_get_large_config` (model/unilm/beit3/modeling_utils.py) set
`img_size=224, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
normalize_output=True, no_output_layer=True, drop_path_rate=0` and the widths below; every other
torchscale `EncoderConfig` field keeps its default, and those defaults fix the architecture we port:

  encoder_normalize_before=True (pre-LN), subln=True (`inner_attn_ln` before out_proj and
  `ffn_layernorm` before fc2), activation_fn="gelu" (exact erf), layernorm_eps=1e-5,
  no_scale_embedding=True (no sqrt(D) factor), rel_pos_buckets=0 / max_rel_pos=0 (no relative bias),
  xpos_rel_pos=False, deepnorm=False (residual alpha = 1), bert_init=False, moe_freq=0,
  max_source_positions=1024, in_chans=3, dropout=attention_dropout=activation_dropout=0.

Only the fields that vary are kept here; the fixed choices above are not configurable on purpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from evf_jax import config_dicts


@dataclasses.dataclass(frozen=True)
class Beit3Config:
  embed_dim: int = 768            # encoder_embed_dim
  num_layers: int = 12            # encoder_layers
  num_heads: int = 12             # encoder_attention_heads
  ffn_dim: int = 3072             # encoder_ffn_embed_dim
  vocab_size: int = 64010
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  max_source_positions: int = 1024  # rows of the text position table (`embed_positions.B`)
  layernorm_eps: float = 1e-5
  pad_token_id: int = 1           # XLM-R `<pad>`; EVF-SAM passes `input_ids == 1` as the padding mask

  def __post_init__(self):
    config_dicts.check_values(self)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

  # Derived sizes.
  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def vision_len(self) -> int:
    """Vision tokens: CLS + patches (197 at 224/16). Also the multiway split in fused inputs."""
    return self.num_patches + 1

  @property
  def vision_positions(self) -> int:
    """Rows of the vision position table `embed_positions.A`: tokens + the fairseq offset 2."""
    return self.vision_len + 2

  @property
  def max_text_len(self) -> int:
    """Longest text sequence the position table allows (positions start at row 2)."""
    return self.max_source_positions - 2

  # Presets.
  @classmethod
  def base(cls) -> "Beit3Config":
    return cls()

  @classmethod
  def large(cls) -> "Beit3Config":
    return cls(embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096)

  @classmethod
  def tiny(cls) -> "Beit3Config":
    """For tests: 2 layers, 32 wide, a 32x32 image (4 patches); every code path of the full model."""
    return cls(embed_dim=32, num_layers=2, num_heads=2, ffn_dim=64, img_size=32, patch_size=16)

  @classmethod
  def preset(cls, name: str) -> "Beit3Config":
    presets = {"tiny": cls.tiny, "base": cls.base, "large": cls.large}
    if name not in presets:
      raise ValueError(f"unknown BEiT-3 size {name!r}; expected one of {sorted(presets)}")
    return presets[name]()

  # JSON.
  def to_dict(self) -> dict[str, Any]:
    return config_dicts.to_dict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Beit3Config":
    return config_dicts.from_dict(cls, d)


PRESETS = ("tiny", "base", "large")
