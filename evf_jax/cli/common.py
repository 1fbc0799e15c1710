"""Flags shared by several sub-commands, spelled as in `evf_jax.runtime`."""

from __future__ import annotations

import argparse
import os
from typing import Iterable

from evf_jax.errors import UserError
from evf_jax.runtime import (
  ATTENTIONS,
  PRECISIONS,
  backend,
  check_attention_platform,
  check_precision_platform,
  compute_dtype,
)


def add_compute_args(p: argparse.ArgumentParser, precision_help: str = "compute precision") -> None:
  p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help=precision_help)
  p.add_argument("--attention", default="xla", choices=list(ATTENTIONS),
                 help="attention kernels: xla, or cudnn (flash attention on NVIDIA GPUs; needs --precision bf16 "
                      "or fp16)")


def check_compute_args(args: argparse.Namespace) -> None:
  """--precision / --attention checked together and against the platform, before anything is loaded."""
  backend()  # a platform jax cannot start is one line here
  compute_dtype(args.precision, args.attention)
  check_attention_platform(args.attention)
  check_precision_platform(args.precision)


def nonempty(value: str) -> str:
  """An argparse type: an empty path would silently mean "none" (no cache, the default model, ...)."""
  if not value.strip():
    raise argparse.ArgumentTypeError("is empty")
  return value


def add_compilation_cache_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--compilation-cache", default=None, metavar="DIR", type=nonempty,
                 help="persistent compilation cache directory (makes later runs start faster)")


def add_overwrite_arg(p: argparse.ArgumentParser, more: str = "") -> None:
  p.add_argument("--overwrite", action="store_true",
                 help="replace files of the same names in --out-dir (an earlier run's outputs); without it they "
                      f"are a one-line error before anything runs{more}")


def check_no_directories(paths: Iterable[str]) -> None:
  """UserError naming the first of `paths` (files this run would write) that is a directory: neither --overwrite
  nor --skip-existing can use it, and writing the file there would fail after the model load."""
  for path in paths:
    if os.path.isdir(path):
      raise UserError(f"{path} is a directory where this run writes a file; move it out of the way or choose "
                      "another --out-dir")


def check_not_there(paths: Iterable[str], overwrite: bool, other_way: str = "") -> None:
  """UserError naming the first of `paths` (what this run would write) that exists, unless `overwrite`;
  `other_way` (", FLAG to ...") is the command's other way past it. A directory is refused either way."""
  paths = list(paths)
  check_no_directories(paths)
  if overwrite:
    return
  for path in paths:
    if os.path.lexists(path):
      raise UserError(f"{path} exists (an earlier run's output?); pass --overwrite to replace it{other_way}, or "
                      "choose another --out-dir")
