"""`run.py prepare`: a raw dataset download (or the generated synthetic set) -> a TFDS dataset (ArrayRecord)."""

from __future__ import annotations

import argparse

from data_pipelines import prepare
from evf_jax.errors import UserError

DEFAULTS = {"records_per_shard": 2000, "num_train": 2000, "num_eval": 200, "seed": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", required=True, choices=prepare.DATASETS, metavar="NAME",
                 help="one of: " + ", ".join(prepare.DATASETS))
  p.add_argument("--src", default=None, help="root of the raw download in the EVF-SAM layout (the builder's "
                 "manual dir), or a directory in the old prepared format to convert; custom: your SPLIT.jsonl "
                 "files (docs/data.md#27-your-own-data); not for synthetic")
  p.add_argument("--name", default=None, help="custom only: the dataset's name (lowercase letters, digits, _), "
                 "as training mixtures and evaluation splits (NAME|SPLIT) will name it")
  p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                 help="TFDS data_dir: the dataset goes to DATA_DIR/NAME/VERSION (refused if that exists)")
  p.add_argument("--out", default=None, help="deprecated: write the old prepared format into this directory")
  # None when not given, so that one given where it does nothing is refused rather than ignored.
  p.add_argument("--records-per-shard", type=int, default=None, help="--out only: images per ArrayRecord shard "
                 f"(default {DEFAULTS['records_per_shard']})")
  p.add_argument("--num-train", type=int, default=None, help=f"synthetic only: train images (default "
                 f"{DEFAULTS['num_train']})")
  p.add_argument("--num-eval", type=int, default=None, help="synthetic only: eval ('val') images (default "
                 f"{DEFAULTS['num_eval']})")
  p.add_argument("--seed", type=int, default=None, help=f"synthetic only: generator seed (default {DEFAULTS['seed']})")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_numbers(args: argparse.Namespace) -> None:
  """Named here, rather than TFDS's "No examples were yielded", numpy's seed error or a ZeroDivisionError; a
  number given where nothing reads it is refused. Fills in the defaults."""
  synthetic_only = [f"--{k.replace('_', '-')}" for k in ("num_train", "num_eval", "seed")
                    if getattr(args, k) is not None]
  if args.dataset != "synthetic" and synthetic_only:
    raise UserError(f"{', '.join(synthetic_only)}: for --dataset synthetic only (it is generated; "
                    f"{args.dataset} is read from --src)")
  if args.name is not None and args.dataset != "custom":
    raise UserError(f"--name is for --dataset custom only ({args.dataset} has its own name)")
  if args.data_dir and args.records_per_shard is not None:
    raise UserError("--records-per-shard is for the deprecated --out only (TFDS shards a --data_dir build itself)")
  for key, value in DEFAULTS.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.dataset == "synthetic":
    for flag, value in (("--num-train", args.num_train), ("--num-eval", args.num_eval)):
      if value < 1:
        raise UserError(f"{flag} must be at least 1 (got {value}): every split needs an image")
    if args.seed < 0:
      raise UserError(f"--seed must be 0 or more (got {args.seed})")
  if args.records_per_shard < 1:
    raise UserError(f"--records-per-shard must be at least 1 (got {args.records_per_shard})")


def run(args: argparse.Namespace) -> int:
  if bool(args.data_dir) == bool(args.out):
    raise UserError("give --data_dir (a TFDS data_dir), or the deprecated --out (the old format)")
  _check_numbers(args)
  if args.out:
    summary = prepare.prepare(args.dataset, args.out, args.src, num_train=args.num_train, num_eval=args.num_eval,
                              seed=args.seed, records_per_shard=args.records_per_shard,
                              progress=not args.no_progress)
    where = args.out
  else:
    summary = prepare.build(args.dataset, args.data_dir, args.src, name=args.name, num_train=args.num_train,
                            num_eval=args.num_eval, seed=args.seed, progress=not args.no_progress)
    where = summary["path"]
  splits = ", ".join(f"{k}: {v['images']} images / {v['prompts']} prompts" for k, v in summary["splits"].items())
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
  print(f"wrote {where} ({splits}); skipped: {skipped}")
  return 0
