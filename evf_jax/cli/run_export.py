"""`run.py export`: one kept step of a training run -> an evf-jax checkpoint directory, for `predict`, `eval`,
`serve` and `export-hf`. The run's own `export/` holds only its last (or best) step; this writes any other,
also while the run goes on (the workdir is only read)."""

from __future__ import annotations

import argparse
import os

import ml_collections

from convert.evf import check_out_dir, write_directory
from evf_jax import storage
from evf_jax.cli import common
from evf_jax.errors import UserError
from evf_jax.tokenizer import TextTokenizer, TokenizerError, check_fits_model
from evf_jax.train import checkpointing
from evf_jax.train import config as train_config


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, type=common.nonempty, help="the run's --workdir (a path or gs:// URL)")
  p.add_argument("--step", default="latest",
                 help="a step number the run kept, 'latest' (default), or 'best' (the highest gIoU on the run's "
                      "first eval split)")
  p.add_argument("--out", required=True, type=common.nonempty,
                 help="the evf-jax checkpoint directory to write (local; not inside the run's checkpoints/ or "
                      "export/)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing evf-jax checkpoint at --out that holds nothing else (other directories "
                      "are never replaced)")


def _choose(step: str, kept: list[int], best, workdir: str) -> int:
  listing = ", ".join(f"{s} (best)" if s == best else str(s) for s in kept)
  if step == "latest":
    return kept[-1]
  if step == "best":
    if best is None:
      raise UserError(f"--step best: no kept step of {workdir} was evaluated; name one of {listing}")
    return best
  if not step.isdigit():
    raise UserError(f"--step {step!r}: expected a step number, 'latest' or 'best'")
  if int(step) not in kept:
    raise UserError(f"--step {step}: {workdir} keeps no complete checkpoint of that step; it keeps {listing}")
  return int(step)


def run(args: argparse.Namespace) -> int:
  workdir = storage.resolve(args.workdir, "--workdir")
  if storage.is_url(args.out):
    raise UserError(f"--out {args.out}: write the checkpoint to a local directory (copy it to the bucket after)")
  out = os.path.abspath(args.out)
  check_out_dir(out, args.overwrite)
  if not storage.path(workdir).is_dir():
    raise UserError(f"--workdir {workdir}: no such directory")
  saved = checkpointing.read_run_config(workdir)
  if saved is None:
    raise UserError(f"--workdir {workdir}: not a training workdir ({checkpointing.CONFIG_FILE} is missing)")
  kept, best = checkpointing.kept_steps(workdir)
  if not kept:
    raise UserError(f"--workdir {workdir}: the run has no complete checkpoint yet")
  step = _choose(args.step.strip(), kept, best, workdir)
  cfg = ml_collections.ConfigDict(saved)
  model_config = train_config.model_config(cfg.model)
  tokenizer_location, _ = checkpointing.tokenizer_source(cfg, workdir)
  try:
    tokenizer = TextTokenizer(tokenizer_location)
  except TokenizerError as e:  # moved or deleted since the run started
    raise UserError(f"the run's tokenizer: {e}") from None
  check_fits_model(tokenizer, model_config.beit3, lengths=False)
  params = checkpointing.restore_model_params(workdir, step)
  run_record = {"config": saved, "initialisation": checkpointing.read_initialisation(workdir)}
  provenance = checkpointing.training_provenance(run_record, workdir, step)
  write_directory(out, lambda staging: checkpointing.save_trained_model(staging, params, model_config, provenance,
                                                                          tokenizer.model_file))
  print(f"wrote {out}: the model of step {step}{' (the best by gIoU)' if step == best else ''} of {workdir}")
  return 0
