"""`run.py export-hf`: an evf-jax checkpoint (converted, or a training run's export) -> the original's Hugging Face
layout, which EVF-SAM's PyTorch code loads (`convert.export_hf.export_directory`)."""

from __future__ import annotations

import argparse

from convert.export_hf import EXPORT_DTYPES, export_directory
from evf_jax.cli import common


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, type=common.nonempty,
                 help="an evf-jax checkpoint directory (`run.py convert`, or WORKDIR/export of `run.py train`)")
  p.add_argument("--out", required=True, type=common.nonempty,
                 help="the directory to write: config.json, model.safetensors, the tokenizer files")
  p.add_argument("--precision", default=None, choices=list(EXPORT_DTYPES),
                 help="the weights' dtype in the file (default: the checkpoint's own)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier export at --out that holds nothing else (other directories are never "
                      "replaced)")


def run(args: argparse.Namespace) -> int:
  export_directory(args.checkpoint, args.out, precision=args.precision, overwrite=args.overwrite)
  return 0
