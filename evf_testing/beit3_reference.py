"""torchscale BEiT-3 built as EVF-SAM builds it, with seeded random weights (shared by parity tests)."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from convert import io as ckpt_io
from convert.beit3 import convert_beit3
from evf_jax.beit3 import Beit3, Beit3Config
from evf_testing import torch_reference as tr

PAD = 1


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


def make_inputs(cfg: Beit3Config, batch: int = 3, seed: int = 0):
  """Images (NCHW, as torch) and a right-padded batch of prompts of different lengths."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
  lengths = [9, 5, 3][:batch] + [7] * max(0, batch - 3)
  width = max(lengths) + 2  # at least two pads everywhere
  ids = np.full((batch, width), PAD, np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = np.concatenate([[0], rng.integers(4, cfg.vocab_size, n - 2), [2]])
  return images, ids


def run_torch(model, images=None, ids=None):
  torch = tr.import_torch()
  kw = {}
  if images is not None:
    kw["visual_tokens"] = torch.from_numpy(images)
  if ids is not None:
    kw["textual_tokens"] = torch.from_numpy(ids)
    kw["text_padding_position"] = torch.from_numpy(ids == PAD)
  with torch.no_grad():
    return model(**kw)["encoder_out"].numpy()


class Converted:
  """A torch reference and our converted model, built once per size."""

  def __init__(self, cfg: Beit3Config, seed: int = 0):
    self.cfg = cfg
    self.torch_model = torch_beit3(cfg, seed)
    state = tr.state_dict_numpy(self.torch_model)
    with tempfile.TemporaryDirectory() as d:
      path = tr.save_safetensors(state, os.path.join(d, "beit3.safetensors"))
      del state
      loaded = ckpt_io.load_state_dict(path)
    self.params = convert_beit3(loaded, cfg).params
    del loaded
    model = Beit3(cfg)
    self.apply = jax.jit(lambda p, image, ids: model.apply({"params": p}, image=image, input_ids=ids))

  def ours(self, images=None, ids=None):
    image = None if images is None else jnp.asarray(images.transpose(0, 2, 3, 1))
    ids = None if ids is None else jnp.asarray(ids, jnp.int32)
    return np.asarray(self.apply(self.params, image, ids))
