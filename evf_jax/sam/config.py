"""Size presets of SAM (the released ViT-B/L/H and a `tiny` one for tests).

A converted checkpoint stores its `SamConfig` as JSON, so the config is plain data: `to_dict` / `from_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from evf_jax import config_dicts


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Hyper-parameters of SAM. Defaults are ViT-B's; the prompt encoder and mask decoder are the same
  in all released sizes."""
  name: str = "vit_b"
  # Image encoder (ViTDet-style ViT).
  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  # Width of the neck output, the prompt embeddings and the two-way transformer.
  prompt_embed_dim: int = 256
  # Prompt encoder.
  mask_in_chans: int = 16
  # Mask decoder.
  decoder_depth: int = 2
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  # Input normalisation, in 0..255 pixel units (RGB).
  pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
  pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

  def __post_init__(self):
    config_dicts.check_values(self)
    # Lists from JSON become tuples, so configs stay hashable (usable as static jit arguments).
    for f in ("global_attn_indexes", "pixel_mean", "pixel_std"):
      object.__setattr__(self, f, tuple(getattr(self, f)))
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    if self.embed_dim % self.num_heads or self.prompt_embed_dim % self.decoder_num_heads:
      raise ValueError("embedding widths must be divisible by their number of heads")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"global_attn_indexes {bad} are outside depth {self.depth}")

  @property
  def embedding_size(self) -> int:
    """Side of the (square) image-embedding grid."""
    return self.img_size // self.patch_size

  @property
  def low_res_size(self) -> int:
    """Side of the decoder's low-resolution mask logits (256 for the released sizes)."""
    return 4 * self.embedding_size

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1

  def to_dict(self) -> dict[str, Any]:
    return config_dicts.to_dict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SamConfig":
    return config_dicts.from_dict(cls, d)

  @classmethod
  def preset(cls, name: str) -> "SamConfig":
    try:
      return SAM_CONFIGS[name]
    except KeyError:
      raise ValueError(f"unknown SAM size {name!r}; known: {sorted(SAM_CONFIGS)}") from None


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(name="vit_l", embed_dim=1024, depth=24, num_heads=16,
                       global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(name="vit_h", embed_dim=1280, depth=32, num_heads=16,
                       global_attn_indexes=(7, 15, 23, 31)),
    # For tests: every code path at toy size. The 6x6 embedding grid is not a multiple of the window (4),
    # so windowed blocks pad; block 1 attends globally.
    "tiny": SamConfig(name="tiny", img_size=96, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), prompt_embed_dim=32, mask_in_chans=8,
                      decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32),
}
