"""Analytic FLOP counts (2 per multiply-add) of EVF-SAM's and EVF-SAM2's parts, for MFU and benchmarks. XLA's own
count does not see inside fused attention kernels and includes rematerialised work, so model FLOPs are counted by
hand.
Matmuls and attention products are counted; normalisations, activations and softmax are not.
"""

from __future__ import annotations

from evf_jax.beit3.config import Beit3Config
from evf_jax.evf import EvfConfig
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.sam.config import SamConfig
from evf_jax.sam2.config import Sam2Config

# Peak dense bf16 FLOP/s per chip, by jax's `device_kind` (prefix match), for MFU when a config gives none.
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA GH200": 989e12, "NVIDIA A100": 312e12,
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


def _mask_decoder(c: int, g: int, tokens: int, depth: int, mlp_dim: int, downsample_rate: int, mask_tokens: int,
                  iou_head_depth: int, iou_head_hidden_dim: int) -> float:
  """SAM's mask decoder (SAM-2's is the same plus extra tokens and heads) for one prompt: the two-way transformer
  over `tokens` output and prompt tokens and the g x g image tokens of width c, the upscaling, the
  hypernetwork MLPs, the mask product (all mask tokens, as computed) and the IoU head."""
  hw, ci = g * g, c // downsample_rate  # ci: the cross attentions' inner width

  def attention(q_len, kv_len, inner):
    return 2 * q_len * c * inner + 2 * 2 * kv_len * c * inner + 2 * 2 * q_len * kv_len * inner + 2 * q_len * inner * c

  flops = 0
  for _ in range(depth):
    flops += attention(tokens, tokens, c)      # self attention of the tokens
    flops += attention(tokens, hw, ci)         # tokens -> image
    flops += 2 * 2 * tokens * c * mlp_dim
    flops += attention(hw, tokens, ci)         # image -> tokens
  flops += attention(tokens, hw, ci)           # final tokens -> image
  up1, up2 = 2 * g, 4 * g                      # two stride-2 transposed convs: 256 -> 64 -> 32 channels
  flops += 2 * up1 * up1 * c * (c // 4) + 2 * up2 * up2 * (c // 4) * (c // 8)
  flops += mask_tokens * 3 * 2 * c * c         # hypernetwork MLPs (3 layers, about c x c each)
  flops += 2 * mask_tokens * (c // 8) * up2 * up2
  flops += iou_head_depth * 2 * c * iou_head_hidden_dim
  return float(flops)


def sam_decoder(sam: SamConfig, sparse_tokens: int = 1) -> float:
  """SAM's prompt path for one prompt: the two-way transformer over (IoU + mask tokens + sparse prompts) and
  the image tokens, the upscaling, the hypernetwork MLPs and the mask product (all mask tokens, as computed)."""
  return _mask_decoder(sam.prompt_embed_dim, sam.embedding_size, 1 + sam.num_mask_tokens + sparse_tokens,
                       sam.decoder_depth, sam.decoder_mlp_dim, sam.attention_downsample_rate, sam.num_mask_tokens,
                       sam.iou_head_depth, sam.iou_head_hidden_dim)


def sam2_encoder(cfg: Sam2Config) -> float:
  """SAM-2's image side on one image, as `Sam2.embed_image` runs it: the Hiera trunk, the FPN neck's lateral
  1x1 convs and the decoder's `conv_s0` / `conv_s1`. Windowed blocks pad the grid before qkv, so qkv, the
  attention and proj count the padded windows (and a q-pooling block's pooled queries); the MLP and the
  stage-change `proj` count the real grid. The neck's top-down upsample-and-add and the background position
  embedding's resize are elementwise or tiny (under 1e-3 of the total from Hiera-T's size on) and not counted."""
  sizes = cfg.trunk_grid_sizes
  side = sizes[0]
  flops = 2 * side * side * (3 * 7 * 7) * cfg.embed_dim
  sy, sx = cfg.q_stride
  for spec in cfg.block_specs():
    d, do = spec.dim, spec.dim_out
    if d != do:
      flops += 2 * side * side * d * do
    out_side = side // sy if spec.q_pool else side
    if spec.window_size:
      ws = spec.window_size
      n_win, kv = (-(-side // ws)) ** 2, ws * ws
      q = (ws // sy) * (ws // sx) if spec.q_pool else kv
    else:
      n_win, kv = 1, side * side
      q = out_side * (side // sx) if spec.q_pool else kv
    flops += 2 * n_win * kv * d * 3 * do + 2 * 2 * n_win * q * kv * do + 2 * n_win * q * do * do
    flops += 2 * 2 * out_side * out_side * do * int(cfg.mlp_ratio * do)
    side = out_side
  c = cfg.d_model
  for level in _neck_levels(cfg):
    flops += 2 * sizes[level] ** 2 * cfg.channel_list[len(sizes) - 1 - level] * c
  return float(flops) + _sam2_high_res_projections(cfg)


def _sam2_high_res_projections(cfg: Sam2Config) -> float:
  """The decoder's `conv_s0` / `conv_s1` on the neck's two finest levels, once per image."""
  if not cfg.use_high_res_features_in_sam:
    return 0.0
  c, sizes = cfg.d_model, cfg.trunk_grid_sizes
  return float(2 * sizes[0] ** 2 * c * (c // 8) + 2 * sizes[1] ** 2 * c * (c // 4))


def _neck_levels(cfg: Sam2Config) -> list[int]:
  """The trunk levels (finest first) whose lateral conv reaches a level kept after `scalp`: the kept ones, and a
  scalped one that a kept level's top-down path adds in (Hiera's coarsest, in the released configs)."""
  n = len(cfg.stages)
  needed = set(range(n - cfg.scalp))
  for level in range(n - 1):
    if level in needed and level in cfg.fpn_top_down_levels:
      needed.add(level + 1)
  return sorted(needed)


def sam2_decoder(cfg: Sam2Config, sparse_tokens: int = 1) -> float:
  """SAM-2's mask decoder for one prompt: SAM's, with the object-score token in the transformer and its head
  (the high-res skip adds are elementwise; `conv_s0` / `conv_s1` run once per image, in `sam2_encoder`)."""
  c, n_masks = cfg.d_model, cfg.num_multimask_outputs + 1
  obj = 1 if cfg.pred_obj_scores else 0
  flops = _mask_decoder(c, cfg.embedding_size, obj + 1 + n_masks + sparse_tokens, cfg.decoder_depth,
                        cfg.decoder_mlp_dim, cfg.attention_downsample_rate, n_masks, cfg.iou_head_depth,
                        cfg.iou_head_hidden_dim)
  if cfg.pred_obj_scores:
    flops += 2 * (2 * c * c + c) if cfg.pred_obj_scores_mlp else 2 * c
  return flops


def beit3_patch_embedding(cfg: Beit3Config) -> float:
  """BEiT-3's patch embedding of one image (once per image: its prompts share the patch tokens)."""
  return float(2 * cfg.num_patches * (cfg.in_chans * cfg.patch_size ** 2) * cfg.embed_dim)


def beit3(cfg: Beit3Config, text_len: int) -> float:
  """BEiT-3's encoder layers on one (image, text) pair of `text_len` tokens."""
  t, d = cfg.vision_len + text_len, cfg.embed_dim
  per_layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * cfg.ffn_dim
  return float(cfg.num_layers * per_layer)


def projector(config: EvfConfig | EvfSam2Config) -> float:
  return float(2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.out_dim)


def train_step(config: EvfConfig | EvfSam2Config, *, images: int, prompts_per_image: int, text_len: int,
               encoder_frozen: bool, decoder_trained: bool = True) -> float:
  """Model FLOPs of one training step of EVF-SAM (`EvfConfig`) or EVF-SAM2 (`EvfSam2Config`). A trained part
  costs 3x its forward (forward, input gradient, weight gradient); a frozen image encoder runs forward only (1x);
  a frozen mask decoder (`decoder_trained=False`, EVF-SAM2's default) costs 2x, as the gradient still flows
  through its activations back to the prompt (an upper bound: the first layer's image-side projections do not
  see the prompt and need none; XLA counts 1.8x at Hiera-L). BEiT-3 and the projector are always trained.
  SAM-2's `conv_s0` / `conv_s1` belong to the decoder but run with the encoder: trained under a frozen encoder,
  they cost 3x. The mask upsampling and the loss are not counted."""
  if isinstance(config, EvfSam2Config):
    encoder, decoder = sam2_encoder(config.sam2), sam2_decoder(config.sam2)
    if encoder_frozen and decoder_trained:
      encoder += 2 * _sam2_high_res_projections(config.sam2)
  else:
    encoder, decoder = sam_encoder(config.sam), sam_decoder(config.sam)
  per_image = encoder * (1 if encoder_frozen else 3) + 3 * beit3_patch_embedding(config.beit3)
  text = beit3(config.beit3, text_len) + projector(config)
  prompts = images * prompts_per_image
  if decoder_trained:
    return images * per_image + 3 * prompts * (text + decoder)
  return images * per_image + prompts * (3 * text + 2 * decoder)
