"""`run.py convert`: a PyTorch EVF-SAM or EVF-SAM2 checkpoint (Hugging Face layout) -> an evf-jax checkpoint
directory. The family is read from the weights' keys (`convert.evf.convert_directory`)."""

from __future__ import annotations

import argparse

from convert.evf import STORED_DTYPES, convert_directory
from evf_jax.cli import common


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--src", required=True, type=common.nonempty,
                 help="a Hugging Face-style EVF-SAM / EVF-SAM2 directory (config.json + model.safetensors / "
                      "sharded safetensors / pytorch_model.bin + tokenizer files), or a hub id like YxZhang/evf-sam")
  p.add_argument("--out", required=True, type=common.nonempty, help="the evf-jax checkpoint directory to write")
  p.add_argument("--precision", default="fp32", choices=list(STORED_DTYPES),
                 help="precision the weights are stored in")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing evf-jax checkpoint at --out that holds nothing else (other directories "
                      "are never replaced)")


def run(args: argparse.Namespace) -> int:
  convert_directory(args.src, args.out, precision=args.precision, overwrite=args.overwrite)
  return 0
