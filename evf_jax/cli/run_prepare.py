"""`run.py prepare`: a raw dataset download (or the generated synthetic set) -> ArrayRecord shards."""

from __future__ import annotations

import argparse

from data_pipelines import prepare

HELP = "convert a raw dataset download (or the synthetic set) into ArrayRecord shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", required=True, choices=prepare.DATASETS, metavar="NAME",
                 help="one of: " + ", ".join(prepare.DATASETS))
  p.add_argument("--src", default=None, help="root of the raw download in the EVF-SAM layout (not for synthetic)")
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--records-per-shard", type=int, default=2000, help="images per ArrayRecord shard")
  p.add_argument("--num-train", type=int, default=2000, help="synthetic only: train images")
  p.add_argument("--num-eval", type=int, default=200, help="synthetic only: eval ('val') images")
  p.add_argument("--seed", type=int, default=0, help="synthetic only: generator seed")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  summary = prepare.prepare(args.dataset, args.out, args.src, num_train=args.num_train, num_eval=args.num_eval,
                            seed=args.seed, records_per_shard=args.records_per_shard,
                            progress=not args.no_progress)
  splits = ", ".join(f"{k}: {v['images']} images / {v['prompts']} prompts" for k, v in summary["splits"].items())
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
  print(f"wrote {args.out} ({splits}); skipped: {skipped}")
  return 0
