"""`run.py predict`: masks for text prompts on one image, written as PNGs (and optionally logits)."""

from __future__ import annotations

import argparse
import os

from evf_jax.cli import common
from evf_jax.errors import UserError
from evf_jax.images import load_image, save_prediction
from evf_jax.predictor import Predictor

HELP = "segment an image by text prompts with an evf-jax checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="an evf-jax checkpoint directory (from `run.py convert`, or a training run's export/)")
  p.add_argument("--image", required=True, help="the image (JPEG, PNG, WebP, BMP, ...)")
  p.add_argument("--prompt", action="append", required=True,
                 help="a referring text; repeat for several (e.g. --prompt 'zebra top left' --prompt '[semantic] sky')")
  p.add_argument("--out-dir", required=True, help="where to write <stem>_<i>_mask.png and <stem>_<i>_vis.png")
  p.add_argument("--save-logits", action="store_true", help="also write <stem>_<i>_logits.npy (float32, H x W)")
  common.add_compute_args(p)
  p.add_argument("--max-text-len", type=int, default=None,
                 help="longest prompt in tokens (special tokens included); longer ones are truncated with a warning")
  common.add_compilation_cache_arg(p)


def run(args: argparse.Namespace) -> int:
  prompts = list(args.prompt)
  for i, p in enumerate(prompts):
    if not p.strip():
      raise UserError(f"--prompt {i + 1} is empty or whitespace-only")
  common.check_compute_args(args)
  image = load_image(args.image)
  if os.path.isfile(args.out_dir):
    raise UserError(f"--out-dir {args.out_dir} is a file")
  predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, attention=args.attention,
                                        compilation_cache_dir=args.compilation_cache,
                                        max_text_len=args.max_text_len)
  predictor.set_image(image)
  result = predictor.predict(prompts)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(args.image))[0]
  for i, prompt in enumerate(prompts):
    mask = result.masks[i]
    save_prediction(os.path.join(args.out_dir, f"{stem}_{i}"), image, mask,
                    result.logits[i] if args.save_logits else None)
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    print(f"[{i}] {shown!r}: mask area {int(mask.sum())} px ({100.0 * mask.mean():.2f}%), "
          f"score {float(result.scores[i]):.4f}")
  return 0
