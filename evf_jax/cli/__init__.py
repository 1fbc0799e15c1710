"""The application behind `run.py`: one module per sub-command, listed in `COMMANDS`.

The library (the rest of `evf_jax`) never imports this package; this package may import anything (the library,
`convert`, `data_pipelines`). User mistakes (`UserError`) print one line, `error: ...`, and exit with status 2;
bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

from evf_jax.errors import UserError

# name -> (module in evf_jax.cli with add_arguments(parser) and run(args) -> exit code, one-line help). Only the
# command that runs is imported: all of them pull in jax, orbax, gradio and matplotlib, which made `run.py --help`
# and every argparse mistake take seconds.
COMMANDS = {
    "convert": ("run_convert", "convert a PyTorch EVF-SAM or EVF-SAM2 checkpoint into an evf-jax checkpoint "
                               "directory"),
    "export-hf": ("run_export_hf", "write an evf-jax checkpoint (e.g. a training run's export) in the original's "
                                   "Hugging Face layout, for EVF-SAM's PyTorch code"),
    "predict": ("run_predict", "segment images by text prompts, or a video by one text prompt, with an evf-jax "
                               "checkpoint"),
    "prepare": ("run_prepare", "build a dataset from its raw download (or the synthetic set, or your own data) as "
                               "TFDS ArrayRecord under --data_dir"),
    "eval": ("run_eval", "referring-segmentation evaluation (gIoU / cIoU) of a checkpoint on prepared splits"),
    "train": ("run_train", "train EVF-SAM or EVF-SAM2 from a config (configs/train/*.py) into a workdir; resumes "
                           "when run again"),
    "export": ("run_export", "write one step a training run kept (a number, latest, or best by eval gIoU) as an "
                             "evf-jax checkpoint directory, for predict, eval, serve and export-hf"),
    "synthetic": ("run_synthetic", "the default job: train a small EVF-SAM on generated data, evaluate it against "
                                   "text-blind baselines, predict and draw the results (no downloads)"),
    "serve": ("run_serve", "a web page (gradio) to segment images by text prompts; listens on 127.0.0.1 unless "
                           "--host says otherwise"),
}


def command_module(name: str):
  """The module behind sub-command `name` (imported here, on first use)."""
  return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


class _Parser(argparse.ArgumentParser):
  """argparse with its mistakes as one `error:` line (status 2) pointing at --help, not the usage block."""

  def error(self, message: str):
    print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
  """`run.py`'s parser: every sub-command listed, the arguments of `command` alone (the one given)."""
  parser = _Parser(prog="run.py", description="evf-jax: EVF-SAM in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (_, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_, add_help=name != "train")
    if name == command:
      command_module(name).add_arguments(p)
  return parser


def _one_line_warning(message, category, filename, lineno, line=None):
  return f"warning: {message}\n"


def report_user_error(e: UserError) -> int:
  """Prints a UserError as `error: <first line>` (conversion errors list every problem below it); returns 2."""
  lines = str(e).strip().splitlines()
  print(f"error: {lines[0] if lines else e.__class__.__name__}", file=sys.stderr)
  if len(lines) > 1:
    print("\n".join(lines[1:]), file=sys.stderr)
  return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
  warnings.formatwarning = _one_line_warning
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv[:1] == ["train"]:  # absl flags (ml_collections config_flags), not argparse
      return command_module("train").main(argv[1:])
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    return int(command_module(args.command).run(args) or 0)
  except UserError as e:
    return report_user_error(e)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
