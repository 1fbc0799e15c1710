"""The command line behind `run.py`: one sub-command per job.

User mistakes (`UserError`) print one line, `error: ...`, and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from evf_jax.errors import UserError

# name -> (run(args) -> exit code, one-line help)
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
  """Registers `fn(args) -> int` as a sub-command; `fn.add_arguments(parser)`, if set (before or after
  registration), declares its flags."""
  def deco(fn):
    _COMMANDS[name] = (fn, help)
    return fn
  return deco


def _register_all() -> None:
  # Each module registers its sub-commands on import; imports stay lazy inside the commands.
  from evf_jax import commands  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
  _register_all()
  parser = argparse.ArgumentParser(prog="run.py", description="evf-jax: EVF-SAM in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (fn, help_) in _COMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    getattr(fn, "add_arguments", lambda _: None)(p)
  return parser


def _one_line_warning(message, category, filename, lineno, line=None):
  return f"warning: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
  import warnings
  warnings.formatwarning = _one_line_warning
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(_COMMANDS[args.command][0](args) or 0)
  except UserError as e:
    first = str(e).strip().splitlines()
    print(f"error: {first[0] if first else e.__class__.__name__}", file=sys.stderr)
    if len(first) > 1:  # conversion errors list every problem; keep them, but under the one-line summary
      print("\n".join(first[1:]), file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
