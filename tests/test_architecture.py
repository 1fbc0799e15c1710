"""The layering rule (docs/architecture.md), checked on the source: who may import whom, and imports at the top.

  library      evf_jax/ without evf_jax/cli/: imports none of convert, data_pipelines, benchmarks, tests,
               evf_testing, evf_jax.cli
  converters   convert/: the library only (no data_pipelines, benchmarks, tests, evf_testing, evf_jax.cli)
  data         data_pipelines/: the library only (no convert, benchmarks, tests, evf_testing, evf_jax.cli)
  application  evf_jax/cli/: anything but benchmarks, tests and evf_testing

Inside functions, an import needs a stated reason: a `# lazy: ...` comment on its line (e.g. torch, which
inference never loads).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("evf_jax", "convert", "data_pipelines", "benchmarks", "tests", "evf_testing", "configs")
RULES = {  # layer -> first-party modules it must not import (prefix match on dotted names)
    "library": ("convert", "data_pipelines", "benchmarks", "tests", "evf_testing", "configs", "evf_jax.cli"),
    "converters": ("data_pipelines", "benchmarks", "tests", "evf_testing", "configs", "evf_jax.cli"),
    "data": ("convert", "benchmarks", "tests", "evf_testing", "configs", "evf_jax.cli"),
    "application": ("benchmarks", "tests", "evf_testing"),
}


def layer_of(rel: pathlib.PurePosixPath) -> str | None:
  parts = rel.parts
  if parts[0] == "evf_jax":
    return "application" if len(parts) > 1 and parts[1] == "cli" else "library"
  return {"convert": "converters", "data_pipelines": "data"}.get(parts[0])


def imports(path: pathlib.Path) -> list[tuple[int, str, bool, str]]:
  """(line, imported module, inside a function, the source line) for every import of a file."""
  source = path.read_text()
  lines = source.splitlines()
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((child.lineno, a.name, in_function, lines[child.lineno - 1]) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        names = [f"{child.module}.{a.name}" for a in child.names]
        found.extend((child.lineno, n, in_function, lines[child.lineno - 1]) for n in names)
      visit(child, nested)

  visit(ast.parse(source), False)
  return found


def violations(root: pathlib.Path) -> list[str]:
  bad = []
  for path in sorted(root.rglob("*.py")):
    rel = pathlib.PurePosixPath(path.relative_to(root).as_posix())
    if rel.parts[0] not in ("evf_jax", "convert", "data_pipelines"):
      continue
    layer = layer_of(rel)
    for line, name, in_function, text in imports(path):
      forbidden = [f for f in RULES[layer] if name == f or name.startswith(f + ".")]
      if forbidden:
        bad.append(f"{rel}:{line}: the {layer} imports {name}")
      if in_function and "# lazy:" not in text:
        bad.append(f"{rel}:{line}: import inside a function without a `# lazy: <reason>` comment: {text.strip()}")
  return bad


def test_the_tree_follows_the_layering_rule():
  assert violations(ROOT) == []


@pytest.mark.parametrize("where,code,expect", [
    ("evf_jax/predictor.py", "from data_pipelines import records\n", "the library imports data_pipelines.records"),
    ("evf_jax/sam/sam.py", "import evf_jax.cli\n", "the library imports evf_jax.cli"),
    ("convert/evf.py", "from evf_testing import images\n", "the converters imports evf_testing.images"),
    ("data_pipelines/pipeline.py", "def f():\n  import convert.io\n", "the data imports convert.io"),
    ("evf_jax/metrics.py", "def f():\n  import numpy\n", "import inside a function without"),
])
def test_a_violation_is_caught(tmp_path, where, code, expect):
  """The checker itself: a copy of the tree with one offending import added fails with a message naming it."""
  for top in ("evf_jax", "convert", "data_pipelines"):
    for path in (ROOT / top).rglob("*.py"):
      dst = tmp_path / path.relative_to(ROOT)
      dst.parent.mkdir(parents=True, exist_ok=True)
      dst.write_text(path.read_text())
  target = tmp_path / where
  target.write_text(target.read_text() + "\n\n" + code)
  found = violations(tmp_path)
  assert any(expect in v and where in v for v in found), found


def test_the_package_exports_its_api():
  import evf_jax
  for name in ("Predictor", "load_image", "decode_image", "load_checkpoint", "EvfConfig", "UserError"):
    assert hasattr(evf_jax, name), name
  assert os.path.isfile(ROOT / "pyproject.toml")


def test_the_install_extras_name_jax_extras_that_exist():
  """`pip install -e '.[tpu]'` (or cuda12, cuda13) installs jax's own extra; a jax that renames one, or needs a
  newer Python than pyproject.toml states, fails here instead of at a user's install."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  jax_meta = importlib.metadata.metadata("jax")
  provided = set(jax_meta.get_all("Provides-Extra"))
  extras = project["optional-dependencies"]
  assert set(extras) == {"tpu", "cuda12", "cuda13"}
  for name, requirements in extras.items():
    assert requirements == [f"jax[{name}]"] and name in provided, (name, requirements)
  version = lambda spec: tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))  # noqa: E731
  assert version(project["requires-python"]) >= version(jax_meta["Requires-Python"])


LIGHT_START = r'''
import contextlib, io, sys
import evf_jax
from evf_jax import cli
printed = {}
for argv, status in ((["--help"], 0), (["nope"], 2), ([], 2)):
  with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    try:
      cli.main(argv)
    except SystemExit as e:
      assert e.code == status, (argv, e.code)
    else:
      raise AssertionError(argv)
  printed[" ".join(argv)] = out.getvalue() + err.getvalue()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "numpy", "torch", "orbax", "grain")
               or m.startswith("evf_jax.cli.run_"))
assert not heavy, heavy[:10]
assert all(f"    {name} " in printed["--help"] or f"    {name}\n" in printed["--help"] for name in cli.COMMANDS)
assert "invalid choice: 'nope'" in printed["nope"], printed
assert evf_jax.Predictor.__module__ == "evf_jax.predictor" and "jax" in sys.modules  # imported on first use
print("ok")
'''


def test_the_package_and_the_command_list_start_without_jax():
  """`import evf_jax`, `run.py --help` and a mistyped or missing command import no sub-command, jax or numpy
  (they took 3-9 s when the package imported everything); the exported names still resolve on first use."""
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", LIGHT_START], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_command_has_a_module_with_its_arguments_and_run():
  from evf_jax import cli
  for name in cli.COMMANDS:
    module = cli.command_module(name)
    assert callable(module.add_arguments) and callable(module.run), name
    help_text = cli.build_parser(name).format_help()
    assert name in help_text and cli.COMMANDS[name][1].split()[0] in help_text, name
