"""torchscale BEiT-3 built as EVF-SAM builds it, with seeded random weights (shared by parity tests)."""

from __future__ import annotations

from evf_jax.beit3 import Beit3Config
from tests import torch_reference as tr


def torch_beit3(cfg: Beit3Config, seed: int = 0, randomize: bool = True):
  """torchscale BEiT3 as EVF-SAM's modeling_utils._get_{base,large}_config configure it, randomised."""
  torch = tr.import_torch()
  EncoderConfig, BEiT3 = tr.torchscale_beit3()
  args = EncoderConfig(
      img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
      layernorm_embedding=False, normalize_output=True, no_output_layer=True, drop_path_rate=0,
      encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
      encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.num_layers,
      max_source_positions=cfg.max_source_positions, layernorm_eps=cfg.layernorm_eps)
  torch.manual_seed(seed)
  model = BEiT3(args).eval()
  if randomize:
    tr.randomize_(model, seed)
  return model
