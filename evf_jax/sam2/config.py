"""Size presets of SAM-2: the four released Hiera sizes of SAM 2.0 (Meta calls Hiera-T "tiny") and a `toy` one
for tests.

Trunk, neck, SAM heads and the video memory (memory attention, memory encoder, object pointers). The fields are named after the original's yaml configs
(`configs/sam2/sam2_hiera_*.yaml`) and constructor arguments; a converted checkpoint stores the config as
JSON, so it is plain data (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from evf_jax import config_dicts


class BlockSpec(NamedTuple):
  """One Hiera block as `Hiera.__init__` derives it."""
  dim: int
  dim_out: int
  num_heads: int
  window_size: int  # 0: global attention
  q_pool: bool


@dataclasses.dataclass(frozen=True)
class Sam2Config:
  """Hyper-parameters of SAM-2. Defaults are the `Hiera` constructor's and `sam2_hiera_*.yaml`'s common values
  (Hiera-B+ uses the constructor defaults for its trunk)."""
  name: str = "hiera_b+"
  image_size: int = 1024
  # Hiera trunk.
  embed_dim: int = 112
  num_heads: int = 2
  stages: tuple[int, ...] = (2, 3, 16, 3)
  global_att_blocks: tuple[int, ...] = (12, 16, 20)
  window_spec: tuple[int, ...] = (8, 4, 14, 7)
  window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
  q_pool: int = 3
  q_stride: tuple[int, int] = (2, 2)
  dim_mul: float = 2.0
  head_mul: float = 2.0
  mlp_ratio: float = 4.0
  # FPN neck. `d_model` is also the width of the SAM heads (SAM2Base's hidden_dim).
  d_model: int = 256
  fpn_top_down_levels: tuple[int, ...] = (2, 3)
  fpn_interp_model: str = "nearest"
  fuse_type: str = "sum"
  scalp: int = 1
  # SAM heads (SAM2Base._build_sam_heads: these are fixed there, except as noted).
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  # SAM2Base options of the released configs.
  use_high_res_features_in_sam: bool = True
  iou_prediction_use_sigmoid: bool = True
  pred_obj_scores: bool = True
  pred_obj_scores_mlp: bool = True
  use_multimask_token_for_obj_ptr: bool = True
  directly_add_no_mem_embed: bool = True
  # Set by build_sam2(apply_postprocessing=True); acts only on single-mask output.
  dynamic_multimask_via_stability: bool = True
  dynamic_multimask_stability_delta: float = 0.05
  dynamic_multimask_stability_thresh: float = 0.98
  # Video memory (SAM2Base's constructor and the yaml's memory_attention / memory_encoder). The memory encoder
  # and memory attention run at d_model; stored memories are mem_dim wide, so an object pointer (d_model wide)
  # enters the memory as d_model / mem_dim tokens.
  mem_dim: int = 64
  num_maskmem: int = 7  # the conditioning frame + up to 6 previous frames
  memory_attention_layers: int = 4
  memory_attention_heads: int = 1
  memory_attention_mlp_dim: int = 2048
  rope_theta: float = 10000.0
  fuser_layers: int = 2
  max_obj_ptrs_in_encoder: int = 16
  sigmoid_scale_for_mem_enc: float = 20.0
  sigmoid_bias_for_mem_enc: float = -10.0
  # Input normalisation, in 0..255 pixel units (RGB): ImageNet's, as EVF-SAM2's image path applies it.
  pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
  pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

  def __post_init__(self):
    config_dicts.check_values(self)
    for f in ("stages", "global_att_blocks", "window_spec", "window_pos_embed_bkg_spatial_size", "q_stride",
              "fpn_top_down_levels", "pixel_mean", "pixel_std"):
      object.__setattr__(self, f, tuple(getattr(self, f)))
    if len(self.stages) != len(self.window_spec):
      raise ValueError(f"stages {self.stages} and window_spec {self.window_spec} differ in length")
    if not 0 <= self.q_pool <= len(self.stages) - 1:
      raise ValueError(f"q_pool {self.q_pool} must be in [0, {len(self.stages) - 1}]")
    if not 0 <= self.scalp < len(self.stages):
      raise ValueError(f"scalp {self.scalp} must be in [0, {len(self.stages)})")
    if self.use_high_res_features_in_sam and len(self.stages) - self.scalp < 3:
      raise ValueError("high-resolution features need 3 neck levels after the scalp")
    if self.fpn_interp_model not in ("nearest", "bilinear") or self.fuse_type not in ("sum", "avg"):
      raise ValueError(f"unsupported neck fusion {self.fpn_interp_model!r} / {self.fuse_type!r}")
    sizes = self.trunk_grid_sizes
    if sizes[0] % self.window_spec[0]:
      raise ValueError(f"the patch grid {sizes[0]} is not a multiple of window_spec[0] {self.window_spec[0]} "
                       "(the windowed position embedding is tiled over it)")
    if self.d_model % self.mem_dim or self.d_model % self.memory_attention_heads:
      raise ValueError(f"d_model {self.d_model} must be a multiple of mem_dim {self.mem_dim} and of "
                       f"memory_attention_heads {self.memory_attention_heads}")
    if self.embedding_size * 16 != self.image_size:
      raise ValueError(f"the image embedding ({self.embedding_size}) must be 1/16 of image_size {self.image_size}: "
                       "the memory encoder downsamples masks by 16")
    if self.num_maskmem < 1 or self.max_obj_ptrs_in_encoder < 1:
      raise ValueError("num_maskmem and max_obj_ptrs_in_encoder must be >= 1")
    bad = [i for i in self.global_att_blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"global_att_blocks {bad} are outside depth {self.depth}")

  @property
  def depth(self) -> int:
    return sum(self.stages)

  @property
  def stage_ends(self) -> tuple[int, ...]:
    return tuple(sum(self.stages[:i + 1]) - 1 for i in range(len(self.stages)))

  @property
  def q_pool_blocks(self) -> tuple[int, ...]:
    return tuple(e + 1 for e in self.stage_ends[:-1])[:self.q_pool]

  def block_specs(self) -> tuple[BlockSpec, ...]:
    """Every block's widths, heads, window and q-pooling. The window size lags by a block: the first block of a
    stage still uses the previous stage's window."""
    specs, dim, heads, stage = [], self.embed_dim, self.num_heads, 1
    for i in range(self.depth):
      window = 0 if i in self.global_att_blocks else self.window_spec[stage - 1]
      dim_out = dim
      if i - 1 in self.stage_ends:
        dim_out, heads, stage = int(dim * self.dim_mul), int(heads * self.head_mul), stage + 1
      specs.append(BlockSpec(dim, dim_out, heads, window, i in self.q_pool_blocks))
      dim = dim_out
    return tuple(specs)

  @property
  def channel_list(self) -> tuple[int, ...]:
    """Widths of the trunk's stage outputs, lowest resolution first (the neck's backbone_channel_list)."""
    specs = self.block_specs()
    return tuple(specs[e].dim_out for e in reversed(self.stage_ends))

  @property
  def trunk_grid_sizes(self) -> tuple[int, ...]:
    """Side of each stage's (square) token grid: the 7x7 stride-4 patch conv, then a floor halving per q-pool."""
    side = (self.image_size - 1) // 4 + 1
    sizes = []
    for stage in range(len(self.stages)):
      if stage > 0 and stage <= self.q_pool:
        side //= self.q_stride[0]
      sizes.append(side)
    return tuple(sizes)

  @property
  def embedding_size(self) -> int:
    """Side of the image-embedding grid the SAM heads run on (the last neck level kept, 64 at 1024 px)."""
    return self.trunk_grid_sizes[len(self.stages) - 1 - self.scalp]

  @property
  def low_res_size(self) -> int:
    return 4 * self.embedding_size

  # JSON round trip (the fields as plain data; `from_dict` refuses unknown fields).
  to_dict = config_dicts.to_dict
  from_dict = classmethod(config_dicts.from_dict)

  @classmethod
  def preset(cls, name: str) -> Sam2Config:
    if name not in SAM2_CONFIGS:
      raise ValueError(f"unknown SAM-2 size {name!r}; known: {sorted(SAM2_CONFIGS)}")
    return SAM2_CONFIGS[name]


SAM2_CONFIGS: dict[str, Sam2Config] = {
    "hiera_t": Sam2Config(name="hiera_t", embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                          window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": Sam2Config(name="hiera_s", embed_dim=96, num_heads=1, stages=(1, 2, 11, 2),
                          global_att_blocks=(7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": Sam2Config(),
    "hiera_l": Sam2Config(name="hiera_l", embed_dim=144, num_heads=2, stages=(2, 6, 36, 4),
                          global_att_blocks=(23, 33, 43), window_pos_embed_bkg_spatial_size=(7, 7),
                          window_spec=(8, 4, 16, 8)),
    # For tests: every trunk path at toy size (128 px: grids 32/16/8/4). Blocks 4-5 use windows of 6 on the 8x8
    # grid and block 6 pools q inside padded 6-windows (as Hiera-T's block 10 does at 1024 px); the last block's
    # 3-windows pad 4 -> 6; block 5 is global. The SAM heads keep their fixed widths but run at d_model 32.
    "toy": Sam2Config(name="toy", image_size=128, embed_dim=16, num_heads=1, stages=(1, 2, 3, 2),
                      global_att_blocks=(5,), window_spec=(8, 4, 6, 3), window_pos_embed_bkg_spatial_size=(5, 3),
                      d_model=32, mem_dim=16, num_maskmem=3, memory_attention_layers=2, memory_attention_mlp_dim=64,
                      max_obj_ptrs_in_encoder=4),
}
