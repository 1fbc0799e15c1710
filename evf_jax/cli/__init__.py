"""The application behind `run.py`: one module per sub-command, listed in `COMMANDS`.

The library (the rest of `evf_jax`) never imports this package; this package may import anything (the library,
`convert`, `data_pipelines`). User mistakes (`UserError`) print one line, `error: ...`, and exit with status 2;
bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from evf_jax.cli import (run_convert, run_eval, run_export, run_export_hf, run_predict, run_prepare, run_serve,
                         run_synthetic, run_train)
from evf_jax.errors import UserError

# name -> module with HELP, add_arguments(parser) and run(args) -> exit code.
COMMANDS = {
    "convert": run_convert,
    "export-hf": run_export_hf,
    "predict": run_predict,
    "prepare": run_prepare,
    "eval": run_eval,
    "train": run_train,
    "export": run_export,
    "synthetic": run_synthetic,
    "serve": run_serve,
}


class _Parser(argparse.ArgumentParser):
  """argparse with its mistakes as one `error:` line (status 2) pointing at --help, not the usage block."""

  def error(self, message: str):
    print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="run.py", description="evf-jax: EVF-SAM in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, module in COMMANDS.items():
    module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP, add_help=name != "train"))
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
      return run_train.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(COMMANDS[args.command].run(args) or 0)
  except UserError as e:
    return report_user_error(e)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
