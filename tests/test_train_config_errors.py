"""Bad `--config` files and stray arguments of `run.py train` and `run.py synthetic`: one `error:` line naming the
file (or the arguments) and the reason, before anything is built; never a traceback or a misleading message."""

from __future__ import annotations

import os

import pytest
from ml_collections import ConfigDict

from evf_jax import cli
from evf_jax.cli import run_train
from evf_jax.train import config as train_config
from evf_testing.cli_errors import error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "configs", "train", "synthetic.py")


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
  """A mistake let through would start training: fail at once instead (both commands train with this)."""
  def train(*args, **kwargs):
    raise AssertionError("the mistake was not caught before training")
  monkeypatch.setattr(run_train, "train", train)


def _argv(command: str, config: str, workdir) -> list[str]:
  return [command, "--config", config, "--workdir", str(workdir)]


# (file name, its content, what the error line says after "--config <path>")
BAD_FILES = [
    ("c.json", '{"total_steps": 3}', ": not a Python file"),
    ("empty.py", "", ": defines no get_config()"),
    ("no_get_config.py", "seed = 1\n", ": defines no get_config()"),
    ("binary.py", b"\x00\x01\x02\x03", ": not Python source (source code string cannot contain null bytes)"),
    ("png.py", b"\x89PNG\r\n\x1a\n", ": line 1: SyntaxError: (unicode error) 'utf-8' codec can't decode byte 0x89"),
    ("syntax.py", "def get_config(:\n  pass\n", ": line 1: SyntaxError: "),
    ("import_name.py", "import os\nundefined_name\n", ": line 2: NameError: name 'undefined_name' is not defined"),
    ("import_raises.py", "raise RuntimeError('no GPU here\\nsecond line')\n", ": line 1: RuntimeError: no GPU here"),
    ("get_name.py", "def get_config(arg=None):\n  return undefined_name\n",
     ": get_config() raised NameError at line 2: name 'undefined_name' is not defined"),
    ("get_raises.py", "def get_config():\n  return {}['x']\n", ": get_config() raised KeyError at line 2: 'x'"),
    ("returns_dict.py", "def get_config(arg=None):\n  return {'total_steps': 3}\n",
     ": get_config() returned dict, not an ml_collections.ConfigDict"),
    ("returns_none.py", "def get_config(arg=None):\n  pass\n",
     ": get_config() returned NoneType, not an ml_collections.ConfigDict"),
]


@pytest.mark.parametrize("command", ["train", "synthetic"])
@pytest.mark.parametrize("name,content,expect", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_config_file_is_one_line_naming_it(command, name, content, expect, tmp_path, capsys):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  line = error_line(capsys, _argv(command, str(path), tmp_path / "w"))
  assert f"error: --config {path}{expect}" in line, line


@pytest.mark.parametrize("command", ["train", "synthetic"])
@pytest.mark.parametrize("config,expect", [
    ("{tmp}/nope.py", "error: --config: [Errno 2] No such file or directory: '{tmp}/nope.py'"),
    ("{tmp}", "error: --config: [Errno 21] Is a directory: '{tmp}'"),
    ("", "error: --config is empty"),
    (f"{SYNTHETIC}:sam2=ture", f"error: --config {SYNTHETIC}:sam2=ture: config argument sam2=ture: expected true"),
    (f"{ROOT}/configs/train/refcoco.py:size=giant", "refcoco.py:size=giant: size=giant: expected huge or base"),
], ids=["missing", "directory", "empty", "bad-argument", "bad-size"])
def test_a_missing_file_or_bad_argument_is_one_line(command, config, expect, tmp_path, capsys):
  line = error_line(capsys, _argv(command, config.format(tmp=tmp_path), tmp_path / "w"))
  assert expect.format(tmp=tmp_path) in line, line


@pytest.mark.parametrize("extra,expect", [
    (["extra"], "unexpected argument 'extra': run.py train takes only flags"),
    (["a", "b"], "unexpected arguments 'a', 'b'"),
    (["config.total_steps=3"], "unexpected argument 'config.total_steps=3'"),
    (["config.total_steps=3"], "did you mean --config.total_steps=3?"),
    (["\u2014config.total_steps=3"], "did you mean --config.total_steps=3?"),  # an em dash pasted from a document
    (["--", "--config.total_steps=3"], "unexpected argument '--config.total_steps=3'"),  # after absl's "--"
], ids=["one", "two", "no-dashes", "hint", "em-dash", "after-double-dash"])
def test_train_refuses_stray_arguments(extra, expect, tmp_path, capsys):
  line = error_line(capsys, _argv("train", SYNTHETIC, tmp_path / "w") + extra)
  assert expect in line, line


def test_the_loader_passes_the_argument_and_leaves_the_config_unlocked():
  cfg = train_config.load_file(f"{SYNTHETIC}:sam2")
  assert isinstance(cfg, ConfigDict) and not cfg.is_locked
  assert cfg.model != train_config.load_file(SYNTHETIC).model  # the argument reached get_config


def test_the_custom_config_trains_and_evaluates_the_named_datasets():
  custom = os.path.join(ROOT, "configs", "train", "custom.py")
  cfg = train_config.load_file(f"{custom}:name=shoes+boots")
  assert cfg.data.mixture.to_dict() == {"custom": (1.0, ("shoes", "boots"))}
  assert cfg.evals == ("shoes|val", "boots|val") and cfg.export_best and "sam" in cfg.model
  cfg = train_config.load_file(f"{custom}:name=shoes,sam2,val=")  # nothing evaluated: the last step is exported
  assert cfg.evals == () and not cfg.export_best
  assert "sam2" in cfg.model and cfg.trainable == train_config.EVF_SAM2_TRAINABLE


@pytest.mark.parametrize("command", ["train", "synthetic"])
def test_help_still_works(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main([command, "--help"])
  assert exit_.value.code == 0
  assert "--config" in capsys.readouterr().out


def test_a_flag_taken_as_the_workdir_is_refused(tmp_path, capsys, monkeypatch):
  """`--workdir $W` with W unset: absl takes the next flag as the workdir, and the run trained into
  ./--config.total_steps=3 with the override lost."""
  monkeypatch.chdir(tmp_path)
  line = error_line(capsys, ["train", "--config", SYNTHETIC, "--workdir", "--config.total_steps=3"])
  assert "--workdir --config.total_steps=3: a flag taken as its value" in line, line
  line = error_line(capsys, ["train", "--config", SYNTHETIC, "--workdir", "w", "--compilation_cache", "--workdir=x"])
  assert "--compilation_cache --workdir=x: a flag taken as its value" in line, line
  assert os.listdir(tmp_path) == []

