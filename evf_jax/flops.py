"""Analytic FLOP counts (2 per multiply-add) of EVF-SAM's parts, for MFU and benchmarks. XLA's own count does
not see inside fused attention kernels and includes rematerialised work, so model FLOPs are counted by hand.
Matmuls and attention products are counted; normalisations, activations and softmax are not.
"""

from __future__ import annotations

from evf_jax.beit3.config import Beit3Config
from evf_jax.evf import EvfConfig
from evf_jax.sam.config import SamConfig

# Peak dense bf16 FLOP/s per chip, by jax's `device_kind` (prefix match), for MFU when a config gives none.
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """The chip's bf16 peak from `PEAK_BF16_FLOPS`, or None (CPUs, unknown chips: no MFU)."""
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def windows_per_image(sam: SamConfig) -> tuple[int, int]:
  """(windows per image, tokens per window) of SAM's windowed blocks: the grid is zero-padded up to a
  multiple of the window (64 -> 70 at 1024 px, 25 windows of 14 x 14)."""
  g, w = sam.embedding_size, sam.window_size
  return (-(-g // w)) ** 2, w * w


def sam_encoder(sam: SamConfig) -> float:
  """SAM's ViT image encoder on one image. Linear layers count real tokens only (the windows' padding runs
  qkv and proj in the reference but not here); windowed attention counts the padded windows."""
  g = sam.embedding_size
  t, d = g * g, sam.embed_dim
  n_win, tw = windows_per_image(sam)
  flops = 2 * t * (3 * sam.patch_size ** 2) * d
  for i in range(sam.depth):
    flops += 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * int(sam.mlp_ratio * d)
    flops += (2 * 2 * t * t * d) if i in sam.global_attn_indexes else (2 * 2 * n_win * tw * tw * d)
  c = sam.prompt_embed_dim
  flops += 2 * t * d * c + 2 * t * c * c * 9
  return float(flops)


def sam_decoder(sam: SamConfig, sparse_tokens: int = 1) -> float:
  """SAM's prompt path for one prompt: the two-way transformer over (IoU + mask tokens + sparse prompts) and
  the image tokens, the upscaling, the hypernetwork MLPs and the mask product (all mask tokens, as computed)."""
  c, g = sam.prompt_embed_dim, sam.embedding_size
  hw, n = g * g, 1 + sam.num_mask_tokens + sparse_tokens
  ci = c // sam.attention_downsample_rate  # the cross attentions' inner width

  def attention(q_len, kv_len, inner):
    return 2 * q_len * c * inner + 2 * 2 * kv_len * c * inner + 2 * 2 * q_len * kv_len * inner + 2 * q_len * inner * c

  flops = 0
  for _ in range(sam.decoder_depth):
    flops += attention(n, n, c)           # self attention of the tokens
    flops += attention(n, hw, ci)         # tokens -> image
    flops += 2 * 2 * n * c * sam.decoder_mlp_dim
    flops += attention(hw, n, ci)         # image -> tokens
  flops += attention(n, hw, ci)           # final tokens -> image
  up1, up2 = 2 * g, 4 * g                 # two stride-2 transposed convs: 256 -> 64 -> 32 channels
  flops += 2 * up1 * up1 * c * (c // 4) + 2 * up2 * up2 * (c // 4) * (c // 8)
  flops += sam.num_mask_tokens * 3 * 2 * c * c  # hypernetwork MLPs (3 layers, about c x c each)
  flops += 2 * sam.num_mask_tokens * (c // 8) * up2 * up2
  flops += sam.iou_head_depth * 2 * c * sam.iou_head_hidden_dim
  return float(flops)


def beit3_patch_embedding(cfg: Beit3Config) -> float:
  """BEiT-3's patch embedding of one image (once per image: its prompts share the patch tokens)."""
  return float(2 * cfg.num_patches * (cfg.in_chans * cfg.patch_size ** 2) * cfg.embed_dim)


def beit3(cfg: Beit3Config, text_len: int) -> float:
  """BEiT-3's encoder layers on one (image, text) pair of `text_len` tokens."""
  t, d = cfg.vision_len + text_len, cfg.embed_dim
  per_layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * cfg.ffn_dim
  return float(cfg.num_layers * per_layer)


def projector(config: EvfConfig) -> float:
  return float(2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.out_dim)


def train_step(config: EvfConfig, *, images: int, prompts_per_image: int, text_len: int,
               encoder_frozen: bool) -> float:
  """Model FLOPs of one training step: backward = 2x forward for what is trained; a frozen image encoder runs
  forward only (the mask upsampling and loss are not counted)."""
  per_prompt = beit3(config.beit3, text_len) + projector(config) + sam_decoder(config.sam)
  encoder = sam_encoder(config.sam) * (1 if encoder_frozen else 3)
  return images * (encoder + 3 * beit3_patch_embedding(config.beit3)) + 3 * images * prompts_per_image * per_prompt
