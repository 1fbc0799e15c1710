"""The PyTorch EVF-SAM reference, composed from PyPI segment-anything + torchscale + EVF-SAM's glue.

The glue follows hustvl/EVF-SAM (model/evf_sam.py, inference.py): BEiT-3 on (224 image, prompt ids),
encoder_out[:, 0] -> Linear -> ReLU -> Linear -> one sparse prompt (EVF's prompt-encoder change: the
empty sparse tensor and `no_mask_embed` expand to the prompt batch), SAM's mask decoder with
multimask_output=False, `postprocess_masks` to the original size. Preprocessing as its inference.py:
SAM input = torchvision's PIL path (PIL bilinear on uint8) + normalise + bottom/right zero pad;
BEiT-3 input = ToTensor -> bicubic 224x224 without antialias -> normalise 0.5/0.5.
Used by the end-to-end parity test and by the benchmarks.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from evf_jax.evf import EvfConfig
from evf_testing import torch_reference as tr
from evf_testing.beit3_reference import torch_beit3
from evf_testing.sam_reference import build_torch_sam


def build_torch_evf(config: EvfConfig, seed: int = 0):
  """An nn.Module whose state dict has EVF-SAM's key layout, with seeded random weights."""
  torch = tr.import_torch()
  nn = torch.nn

  class EvfReference(nn.Module):
    def __init__(self):
      super().__init__()
      self.visual_model = build_torch_sam(config.sam, seed)
      self.mm_extractor = nn.Module()
      self.mm_extractor.beit3 = torch_beit3(config.beit3, seed + 1)
      d = config.hidden_size
      self.text_hidden_fcs = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(),
                                                          nn.Linear(d, config.out_dim))])
      tr.randomize_(self.text_hidden_fcs, seed + 2)

  return EvfReference().eval()


def sam_input(image: np.ndarray, img_size: int, mean, std):
  """(1, 3, S, S) float tensor and the resized (h, w), as EVF-SAM's `sam_preprocess` (model_type 'ori')."""
  import torch
  h, w = image.shape[:2]
  scale = img_size * 1.0 / max(h, w)
  nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
  resized = np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
  x = torch.from_numpy(resized).permute(2, 0, 1).float()
  x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
  x = torch.nn.functional.pad(x, (0, img_size - nw, 0, img_size - nh))
  return x[None], (nh, nw)


def beit_input(image: np.ndarray, size: int):
  """(1, 3, size, size): ToTensor, bicubic (A=-0.75, no antialias), normalise mean=std=0.5."""
  import torch
  x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255.0
  x = torch.nn.functional.interpolate(x, (size, size), mode="bicubic", align_corners=False, antialias=False)
  return (x - 0.5) / 0.5


def reference_predict(model, config: EvfConfig, image: np.ndarray, input_ids: np.ndarray,
                      image_embeddings=None):
  """Logits (N, H, W) at the original size for right-padded `input_ids` (N, L) on one image.

  With N = 1 and no padding this is exactly EVF-SAM's `inference()`. `image_embeddings` may be passed
  to skip the image encoder (the original recomputes it for every prompt).
  """
  import torch
  sam = model.visual_model
  with torch.no_grad():
    x, input_hw = sam_input(image, config.sam.img_size, config.sam.pixel_mean, config.sam.pixel_std)
    if image_embeddings is None:
      image_embeddings = sam.image_encoder(x)
    h, w = image.shape[:2]
    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    n = ids.shape[0]
    beit = beit_input(image, config.beit3.img_size).expand(n, -1, -1, -1)
    out = model.mm_extractor.beit3(visual_tokens=beit, textual_tokens=ids, text_padding_position=ids == 1)
    feat = model.text_hidden_fcs[0](out["encoder_out"][:, :1])          # (N, 1, 256)
    pe = sam.prompt_encoder
    e = pe.image_embedding_size
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, e[0], e[1])
    low, iou = sam.mask_decoder(image_embeddings=image_embeddings, image_pe=pe.get_dense_pe(),
                                sparse_prompt_embeddings=feat, dense_prompt_embeddings=dense,
                                multimask_output=False)
    masks = sam.postprocess_masks(low, input_size=input_hw, original_size=(h, w))
  return masks[:, 0].numpy(), iou[:, 0].numpy(), image_embeddings


def write_hf_directory(model, config, spm_model_file: str, directory: str) -> str:
  """An HF-style EVF-SAM or EVF-SAM2 directory (`config` an `EvfConfig` or `EvfSam2Config`, `model` its torch
  reference): config.json, model.safetensors, tokenizer files. config.json says model_type "evf" for both
  families, as the released ones do; only `architectures` (which the converter does not read) differs."""
  import shutil
  os.makedirs(directory, exist_ok=True)
  sd = tr.state_dict_numpy(model)
  if hasattr(config, "sam2"):  # EVF-SAM2 saves the memory encoder's layer scale `gamma` as `weight`
    sd = {k[:-len("gamma")] + "weight" if k.startswith("visual_model.memory_encoder.fuser.") and k.endswith(".gamma")
          else k: v for k, v in sd.items()}
  tr.save_safetensors(sd, os.path.join(directory, "model.safetensors"))
  architecture = "EvfSam2Model" if hasattr(config, "sam2") else "EvfSamModel"
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "evf", "sam_scale": config.sam_scale,
               "mm_extractor_scale": config.mm_extractor_scale, "hidden_size": config.hidden_size,
               "out_dim": config.out_dim, "architectures": [architecture]}, f)
  shutil.copy(spm_model_file, os.path.join(directory, "sentencepiece.bpe.model"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 1e30}, f)
  return directory
