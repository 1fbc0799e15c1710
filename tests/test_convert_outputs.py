"""What `run.py convert` / `run.py export-hf` / `run.py predict` read and replace, checked without a model: source
JSON of the wrong shape, --out directories holding the user's files or reached through a symbolic link, output
names taken by directories. The same through the command line: tests/test_cli_inference.py,
tests/test_export_hf.py."""

from __future__ import annotations

import json
import os

import pytest

from convert.evf import CHECKPOINT_ENTRIES, check_model_type, check_out_dir, config_from_hf, write_directory
from convert.io import CheckpointReadError, load_hf_directory
from evf_jax.cli import common
from evf_jax.errors import UserError

RELEASED = {"model_type": "evf", "sam_scale": "huge", "mm_extractor_scale": "large"}


@pytest.mark.parametrize("value,name", [([1, 2], "list"), ("x", "str"), (3, "int"), (None, "NoneType")])
def test_config_that_is_no_object(value, name):
  with pytest.raises(UserError, match=f"^c.json: expected a JSON object, found {name}$"):
    check_model_type(value, "c.json")
  with pytest.raises(UserError, match=f"found {name}"):
    config_from_hf(value, "c.json")


@pytest.mark.parametrize("edit,expect", [
    ({"sam_scale": ["huge"]}, r"sam_scale \['huge'\] is not one of"),
    ({"mm_extractor_scale": {"a": 1}}, r"mm_extractor_scale \{'a': 1\} is not one of"),
    ({"hidden_size": "abc"}, "hidden_size=abc does not fit"),
    ({"out_dim": [256]}, r"out_dim=\[256\] does not fit"),
    ({"evf_jax": [1]}, "'evf_jax' is not a JSON object but a list"),
    ({"evf_jax": {"model_type": "evf", "sam": [1]}}, "'evf_jax' is not a valid EVF-SAM config"),
])
def test_config_fields_of_the_wrong_type(edit, expect):
  with pytest.raises(UserError, match=expect):
    config_from_hf(dict(RELEASED, **edit), "c.json")


@pytest.mark.parametrize("index", ["[1, 2]", '"x"', '{"weight_map": [1]}', '{"weight_map": {"a": 3}}',
                                   '{"weight_map": {}}', '{"metadata": {}}', "{not json"])
def test_shard_index_of_the_wrong_shape(tmp_path, index):
  (tmp_path / "model.safetensors.index.json").write_text(index)
  with pytest.raises(CheckpointReadError, match="model.safetensors.index.json: not a valid shard index") as e:
    load_hf_directory(str(tmp_path))
  assert len(str(e.value).splitlines()) == 1


def _checkpoint_like(d, *extra):
  d.mkdir()
  for name in CHECKPOINT_ENTRIES:
    if name.endswith(".json"):
      (d / name).write_text("{}")
    else:
      (d / name).mkdir()
  for name in extra:
    (d / name).write_text("mine")
  return str(d)


def test_out_holding_other_files_is_never_replaced(tmp_path):
  theirs = _checkpoint_like(tmp_path / "theirs", "notes.txt", "a.png")
  for overwrite in (True, False):  # --overwrite would not help: not suggested
    with pytest.raises(UserError, match=r"holds a\.png, which an evf-jax checkpoint directory does not") as e:
      check_out_dir(theirs, overwrite)
    assert "pass --overwrite" not in str(e.value)
  check_out_dir(_checkpoint_like(tmp_path / "ours"), True)  # a checkpoint's files only: replaced as before
  export = tmp_path / "export"
  export.mkdir()
  (export / "config.json").write_text("{}")
  (export / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="holds notes.txt, which an evf-jax export directory does not"):
    check_out_dir(str(export), True, ours=lambda d: True, kind="an evf-jax export", entries=("config.json",))
  check_out_dir(str(export), True, ours=lambda d: True, kind="an evf-jax export")  # no `entries`: not checked


def test_write_directory_through_a_symbolic_link(tmp_path):
  """The link's target is replaced and the link kept; nothing is left beside either."""
  (tmp_path / "real").mkdir()
  target = _checkpoint_like(tmp_path / "real" / "ckpt")
  (tmp_path / "links").mkdir()
  link = tmp_path / "links" / "ckpt"
  link.symlink_to(target)

  def write(staging):
    os.makedirs(staging)
    with open(os.path.join(staging, "model_config.json"), "w") as f:
      json.dump({"new": True}, f)

  check_out_dir(str(link), True)
  write_directory(str(link), write)
  assert link.is_symlink() and os.readlink(link) == target
  assert os.listdir(target) == ["model_config.json"]
  assert json.loads((link / "model_config.json").read_text()) == {"new": True}
  assert os.listdir(tmp_path / "links") == ["ckpt"] and os.listdir(tmp_path / "real") == ["ckpt"]


def test_write_directory_failure_keeps_the_old_directory(tmp_path):
  out = _checkpoint_like(tmp_path / "ckpt")

  def write(staging):
    os.makedirs(staging)
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    write_directory(out, write)
  assert sorted(os.listdir(out)) == sorted(CHECKPOINT_ENTRIES) and os.listdir(tmp_path) == ["ckpt"]


def test_write_directory_puts_the_old_directory_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
  """The old directory is moved aside before the new one moves in: when that second rename fails, the old one is
  back under its name (not left as ckpt.old-PID) and the new one's files are gone."""
  out = _checkpoint_like(tmp_path / "ckpt")
  (tmp_path / "ckpt" / "model_config.json").write_text('{"old": true}')
  real = os.replace

  def refuse_staging(src, dst):
    if ".partial-" in str(src):
      raise OSError(28, "No space left on device")
    return real(src, dst)

  def write(staging):
    os.makedirs(staging)
    with open(os.path.join(staging, "model_config.json"), "w") as f:
      json.dump({"new": True}, f)

  monkeypatch.setattr(os, "replace", refuse_staging)
  with pytest.raises(OSError, match="No space left"):
    write_directory(out, write)
  assert os.listdir(tmp_path) == ["ckpt"] and sorted(os.listdir(out)) == sorted(CHECKPOINT_ENTRIES)
  assert json.loads((tmp_path / "ckpt" / "model_config.json").read_text()) == {"old": True}


def test_out_that_cannot_be_replaced_is_refused_before_any_work(tmp_path, monkeypatch):
  """Replacing --out renames it in its parent: a parent the user may not write in is one line before the
  conversion (after it, the rename failed with PermissionError's traceback). Root may write anywhere, so
  os.access says no here."""
  parent = tmp_path / "shared"
  parent.mkdir()
  out = _checkpoint_like(parent / "ckpt")
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **k: False if p == str(parent) else real(p, mode, **k))
  with pytest.raises(UserError, match=f"^--out {out}: cannot replace it, cannot write in {parent} \\(permission"):
    check_out_dir(out, True)
  assert sorted(os.listdir(out)) == sorted(CHECKPOINT_ENTRIES)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_name_taken_by_a_directory(tmp_path, overwrite):
  (tmp_path / "a_mask.png").mkdir()
  with pytest.raises(UserError, match="a_mask.png is a directory where this run writes a file"):
    common.check_not_there([str(tmp_path / "a_vis.png"), str(tmp_path / "a_mask.png")], overwrite)
  with pytest.raises(UserError, match="a_mask.png is a directory"):
    common.check_no_directories(str(tmp_path / n) for n in ("a_mask.png", "a_vis.png"))
  common.check_not_there([str(tmp_path / "a_vis.png")], overwrite)
