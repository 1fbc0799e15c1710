"""Per-sample transform: record -> fixed-shape numpy arrays (docs/data.md#1-sample-contract, #3, #4).

Loss targets: GT masks are brought into the SAM frame the same way as the image (resize, then bottom/right pad)
at `mask_size` (default = the SAM input size, 1024), and `valid_region` marks the un-padded part. A trainer
upsamples the 256x256 low-res logits to that frame and averages BCE/Dice over the valid region only.
The original instead upsamples the logits to each image's *original* resolution and computes the loss there;
ours sees the same geometry but at the SAM frame's resolution (a fixed pixel count per image), so each mask's
pixel-mean BCE is taken over a resampled grid. Evaluation is unaffected: `eval_example` keeps GT masks at the
original size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from data_pipelines import records
from evf_jax.beit3 import preprocess
from evf_jax.images import decode_image
from evf_jax.sam.transforms import frame_hw, to_frame
from evf_jax.tokenizer import PAD_ID, truncate_ids


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer: XLM-R ids with specials, `[0] + pieces + [2]`."""

  def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  num_prompts: int = 3  # K: prompts per image, padded with prompt_valid = False
  max_text_len: int = 64  # L: tokens per prompt, padded with PAD_ID, truncated keeping the final </s>
  sam_size: int = 1024  # SAM input frame
  sam_mode: str = "longest_side"  # "longest_side" (SAM-1: resize + pad) or "square" (SAM-2/EffiSAM: stretch)
  mask_size: Optional[int] = None  # S: loss-target resolution in the SAM frame; None -> sam_size
  beit_size: int = 224

  @property
  def target_size(self) -> int:
    return self.mask_size or self.sam_size


def mask_to_frame(mask: np.ndarray, size: int, mode: str) -> np.ndarray:
  """{0,1} (H, W) mask -> {0,1} (size, size) in the SAM frame: bilinear (antialiased) on 0/255, threshold 128.

  Bilinear-then-threshold follows the image's own resampling geometry and, unlike nearest, does not drop
  thin structures at random when shrinking.
  """
  out, _ = to_frame(mask.astype(np.uint8) * 255, size, mode)
  return (out >= 128).astype(np.uint8)


def encode_text(tokenizer: Tokenizer, text: str, max_len: int) -> np.ndarray:
  """One prompt's ids padded to max_len. Too long a prompt is cut as `TextTokenizer.encode_batch` cuts it,
  but silently: training data repeats its long prompts every epoch."""
  ids = truncate_ids(tokenizer.encode(text), max_len)
  out = np.full((max_len,), PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def choose_entries(num_entries: int, k: int, rng: np.random.Generator) -> list[int]:
  """Up to k distinct entry indices, uniformly without replacement (all of them if there are <= k)."""
  if num_entries <= k:
    return list(range(num_entries))
  return sorted(rng.choice(num_entries, size=k, replace=False).tolist())


def image_inputs(rec: records.Record, cfg: SampleConfig) -> dict[str, Any]:
  """What a training sample takes from its image alone (no prompt): the SAM frame, BEiT-3's input, the valid
  region and sizes, and `masks`, a dict filled on demand with the record's masks at the loss resolution."""
  image = decode_image(rec.image)
  h, w = image.shape[:2]
  if (h, w) != (rec.h, rec.w):
    raise ValueError(f"{rec.source}/{rec.image_id}: image is {h}x{w}, record says {rec.h}x{rec.w}")
  sam, resize_hw = to_frame(image, cfg.sam_size, cfg.sam_mode)
  s = cfg.target_size
  t_h, t_w = frame_hw(h, w, s, cfg.sam_mode)
  region = np.zeros((s, s), bool)
  region[:t_h, :t_w] = True
  return {"sam_image": sam, "beit_image": preprocess.beit_image(image, cfg.beit_size), "valid_region": region,
          "resize_hw": np.asarray(resize_hw, np.int32), "orig_hw": np.asarray((h, w), np.int32), "masks": {}}


def train_example(rec: records.Record, chosen: Sequence[int], tokenizer: Tokenizer, cfg: SampleConfig,
                  source_id: int = 0, image: Optional[dict[str, Any]] = None) -> dict[str, np.ndarray]:
  """One training sample with static shapes (see pipeline.BATCH_SPEC for the keys). `image`: the record's
  `image_inputs`, when the caller keeps them (it gains the masks this sample decodes)."""
  image = image_inputs(rec, cfg) if image is None else image
  k, length, s = cfg.num_prompts, cfg.max_text_len, cfg.target_size
  input_ids = np.full((k, length), PAD_ID, np.int32)
  masks = np.zeros((k, s, s), np.uint8)
  valid = np.zeros((k,), bool)
  decoded = image["masks"]
  for slot, e_idx in enumerate(chosen[:k]):
    entry = rec.entries[e_idx]
    input_ids[slot] = encode_text(tokenizer, entry.text, length)
    if entry.mask_index not in decoded:
      decoded[entry.mask_index] = mask_to_frame(rec.mask(entry.mask_index), s, cfg.sam_mode)
    masks[slot] = decoded[entry.mask_index]
    valid[slot] = True
  return {
      "sam_image": image["sam_image"],
      "beit_image": image["beit_image"],
      "input_ids": input_ids,
      "attention_mask": input_ids != PAD_ID,
      "prompt_valid": valid,
      "masks": masks,
      "valid_region": image["valid_region"],
      "resize_hw": image["resize_hw"],
      "orig_hw": image["orig_hw"],
      "source_id": np.asarray(source_id, np.int32),
  }


def eval_example(rec: records.Record, tokenizer: Tokenizer, cfg: SampleConfig) -> dict:
  """Every entry of an eval record, with GT masks at the original resolution (ragged: N_i prompts, H x W).

  Keys: sam_image (S,S,3) uint8, beit_image (224,224,3) f32, input_ids (N,L) i32, attention_mask (N,L) bool,
  masks (N,H,W) uint8 at original size, resize_hw (2,), orig_hw (2,), texts list[str], image_id str, source str.
  """
  image = decode_image(rec.image)
  sam, resize_hw = to_frame(image, cfg.sam_size, cfg.sam_mode)
  n, length = len(rec.entries), cfg.max_text_len
  input_ids = np.stack([encode_text(tokenizer, e.text, length) for e in rec.entries]) if n else \
      np.zeros((0, length), np.int32)
  cache: dict[int, np.ndarray] = {}
  masks = np.zeros((n, rec.h, rec.w), np.uint8)
  for i, e in enumerate(rec.entries):
    if e.mask_index not in cache:
      cache[e.mask_index] = rec.mask(e.mask_index)
    masks[i] = cache[e.mask_index]
  return {
      "sam_image": sam, "beit_image": preprocess.beit_image(image, cfg.beit_size),
      "input_ids": input_ids, "attention_mask": input_ids != PAD_ID, "masks": masks,
      "resize_hw": np.asarray(resize_hw, np.int32), "orig_hw": np.asarray((rec.h, rec.w), np.int32),
      "texts": [e.text for e in rec.entries], "image_id": rec.image_id, "source": rec.source,
  }

