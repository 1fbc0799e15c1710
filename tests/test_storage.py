"""gs:// paths (evf_jax/storage.py) on a local GCS emulator: the file operations a training run needs, and a
model directory written to a bucket (a training run's export) loading as a local one does."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert.export_hf import export_directory
from evf_jax import cli, storage
from evf_jax.checkpoints import load_checkpoint, read_provenance
from evf_jax.errors import UserError
from evf_jax.evf import abstract_params
from evf_jax.tokenizer import TextTokenizer
from evf_jax.train import checkpointing
from evf_testing import spm_model
from evf_testing.training import assert_same_tree, random_params, tiny_config


def test_paths_are_local_or_gs_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("run", "--workdir") == os.path.join(str(tmp_path), "run")
  assert storage.resolve("gs://b/run/", "--workdir") == "gs://b/run"
  for bad, expect in (("s3://b/run", "only local paths and gs:// URLs"), ("gs:///run", "expected gs://BUCKET"),
                      ("gs://", "expected gs://BUCKET"), ("", "^--workdir is empty"), (" ", "^--workdir is empty")):
    with pytest.raises(UserError, match=expect):
      storage.resolve(bad, "--workdir")


def test_outputs_written_locally_refuse_a_url(tmp_path, monkeypatch, capsys):
  """predict's, eval's, convert's and prepare's outputs are written with local file APIs: a gs:// --out-dir was
  a local folder named "gs:"."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match="^--out gs://b/ckpt: expected a local directory"):
    storage.check_output_dir("gs://b/ckpt", "--out")
  assert cli.main(["predict", "--checkpoint", "c", "--image", "x.jpg", "--prompt", "a", "--out-dir", "gs://b/o"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --out-dir gs://b/o: expected a local directory"), err
  assert os.listdir(tmp_path) == []


def test_an_output_dir_through_a_dangling_link_is_one_line(tmp_path, monkeypatch, capsys):
  """A symbolic link to a missing directory, as the output or on its way: refused before any work (predict,
  eval, convert and export-hf failed after it, with os.makedirs's or os.replace's traceback)."""
  monkeypatch.chdir(tmp_path)
  os.symlink(tmp_path / "gone", tmp_path / "dangling")
  for out in ("dangling", "dangling/sub"):
    with pytest.raises(UserError, match=f"^--out-dir {out}: .*dangling is a symbolic link to .*gone, which does not"):
      storage.check_output_dir(out, "--out-dir")
  os.mkdir(tmp_path / "there")
  os.symlink(tmp_path / "there", tmp_path / "link")
  storage.check_output_dir("link/sub", "--out-dir")  # a link to a directory is a directory
  assert cli.main(["predict", "--checkpoint", "c", "--image", "x.jpg", "--prompt", "a", "--out-dir", "dangling"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is a symbolic link to" in err[0], err


def test_a_failed_local_write_keeps_the_earlier_file(tmp_path):
  """write_atomic writes a temporary file and renames it: a write that fails half-way (here: text that cannot be
  encoded) leaves the earlier file whole, as a killed one would (an eval result, a video's track.json)."""
  target = tmp_path / "result.json"
  storage.write_atomic(target, '{"giou": 0.5}')
  with pytest.raises(UnicodeEncodeError):
    storage.write_atomic(target, '{"giou": 0.7, "note": "\ud800"}')
  assert target.read_text() == '{"giou": 0.5}'


def test_a_failed_command_removes_only_the_folders_it_made(tmp_path):
  """output_dir removes the empty folders it created when the body fails, not the user's existing (empty)
  folder they were created in, nor a given --out-dir that already existed. Ctrl-C is a failure too."""
  (tmp_path / "mine").mkdir()
  for out, error in (("mine/a/b", RuntimeError), ("mine/c", KeyboardInterrupt), ("mine", RuntimeError)):
    with pytest.raises(error), storage.output_dir(str(tmp_path / out), "--out-dir"):
      assert (tmp_path / out).is_dir()
      raise error()
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
  """A directory the user may not write in is refused before any work (the tests run as root, who may write
  anywhere, so os.access says no here): the first save failed with PermissionError's traceback after the work."""
  locked = str(tmp_path / "locked")
  os.mkdir(locked)
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **k: False if p == locked else real(p, mode, **k))
  for out in (locked, os.path.join(locked, "new", "sub")):
    with pytest.raises(UserError, match=f"^--out-dir {out}: cannot write in {locked} \\(permission denied\\)$"):
      storage.check_output_dir(out, "--out-dir")


def test_file_operations_on_a_bucket(gcs_bucket, tmp_path):
  root = f"gs://{gcs_bucket}/ops"
  storage.write_atomic(f"{root}/config.json", '{"a": 1}')
  storage.write_atomic(f"{root}/config.json", '{"a": 2}')
  assert json.loads(storage.path(f"{root}/config.json").read_text()) == {"a": 2}
  for line in ("one", "two\n"):
    storage.append_line(f"{root}/metrics.jsonl", line)
  assert storage.path(f"{root}/metrics.jsonl").read_text() == "one\ntwo\n"
  local = tmp_path / "tree"
  (local / "a" / "b").mkdir(parents=True)
  (local / "x.txt").write_text("x")
  (local / "a" / "b" / "y.bin").write_bytes(b"\0\1")
  storage.copy_tree(local, f"{root}/up")
  storage.move_tree(f"{root}/up", f"{root}/moved")
  assert not storage.path(f"{root}/up").exists()
  storage.copy_tree(f"{root}/moved", tmp_path / "down")
  assert (tmp_path / "down" / "x.txt").read_text() == "x" and (tmp_path / "down/a/b/y.bin").read_bytes() == b"\0\1"
  downloaded = storage.local_copy(f"{root}/moved/a/b/y.bin")
  assert not storage.is_url(downloaded) and open(downloaded, "rb").read() == b"\0\1"
  storage.remove_tree(f"{root}/moved")
  storage.remove_tree(f"{root}/moved")  # nothing there: nothing to do
  assert not storage.path(f"{root}/moved").exists()


def test_objects_another_client_wrote_are_seen(gcs_bucket, tmp_path):
  """A run's bucket is also written by tensorstore and by the run's other processes: a folder this process
  listed before they wrote into it copies whole (gcsfs's listing cache, on by default, raised FileNotFoundError
  for the new object)."""
  import fsspec
  root = f"gs://{gcs_bucket}/other_writer"
  storage.write_atomic(f"{root}/d/a.txt", "a")
  assert [p.name for p in storage.path(f"{root}/d").iterdir()] == ["a.txt"]
  assert storage._files_under(root) == ["d/a.txt"]
  other = fsspec.filesystem("gs", skip_instance_cache=True)  # a client of its own, as tensorstore is
  other.pipe(f"{gcs_bucket}/other_writer/d/b.txt", b"b")
  assert sorted(p.name for p in storage.path(f"{root}/d").iterdir()) == ["a.txt", "b.txt"]
  storage.move_tree(root, f"gs://{gcs_bucket}/other_writer_moved")
  storage.copy_tree(f"gs://{gcs_bucket}/other_writer_moved", tmp_path / "down")
  assert (tmp_path / "down/d/b.txt").read_text() == "b" and not storage.path(root).exists()


def test_a_missing_bucket_is_one_line(gcs_bucket):
  storage.check_writable(f"gs://{gcs_bucket}/run", "--workdir")
  with pytest.raises(UserError, match="--workdir gs://no-such-bucket-here/run: cannot write there") as e:
    storage.check_writable("gs://no-such-bucket-here/run", "--workdir")
  assert "\n" not in str(e.value)


def test_an_export_to_a_bucket_loads_as_a_local_one(gcs_bucket, tmp_path):
  """`checkpointing.export` (a training run's last act) into gs:// twice (the second replaces the first) and
  into a local workdir: the same config, parameters, provenance and tokenizer come back from both."""
  config = tiny_config()
  tokenizer_model = os.path.join(spm_model.train(str(tmp_path / "spm")), "sentencepiece.bpe.model")
  workdirs = {"local": str(tmp_path / "run"), "gcs": f"gs://{gcs_bucket}/run"}
  first, params = (random_params(abstract_params(config), seed) for seed in (1, 0))
  checkpointing.export(workdirs["gcs"], first, config, {"step": 1}, tokenizer_model)
  for where, workdir in workdirs.items():
    out = checkpointing.export(workdir, params, config, {"step": 2}, tokenizer_model)
    assert out == f"{workdir}/export"
  loaded = {where: load_checkpoint(f"{w}/export") for where, w in workdirs.items()}
  assert loaded["gcs"][0] == loaded["local"][0] == config
  assert_same_tree(loaded["gcs"][1], params)
  assert_same_tree(loaded["gcs"][1], loaded["local"][1])
  assert read_provenance(f"{workdirs['gcs']}/export") == {"step": 2}
  text = ["the red car on the left", "[semantic] sky"]
  assert np.array_equal(loaded["gcs"][2].encode_batch(text)[0], loaded["local"][2].encode_batch(text)[0])
  assert not storage.path(f"{workdirs['gcs']}/export.partial").exists()
  assert not storage.path(f"{workdirs['gcs']}/export.old").exists()
  assert TextTokenizer(f"{workdirs['gcs']}/export/tokenizer").vocab_size == loaded["local"][2].vocab_size
  # `run.py export-hf` reads the bucket's export as the local one.
  files = {}
  for where, workdir in workdirs.items():
    export_directory(f"{workdir}/export", str(tmp_path / f"hf_{where}"), log=lambda *_: None)
    files[where] = {f: (tmp_path / f"hf_{where}" / f).read_bytes() for f in os.listdir(tmp_path / f"hf_{where}")}
  assert files["gcs"] == files["local"] and "sentencepiece.bpe.model" in files["gcs"]


def test_a_local_mirror_uploads_what_a_finished_writer_wrote(gcs_bucket, tmp_path):
  with storage.LocalMirror(f"gs://{gcs_bucket}/mirror/ok") as m:
    os.makedirs(os.path.join(m.local, "a"))
    open(os.path.join(m.local, "a", "f.txt"), "w").write("f")
  assert storage._files_under(f"gs://{gcs_bucket}/mirror/ok") == ["a/f.txt"] and not os.path.exists(m.local)
  with pytest.raises(RuntimeError), storage.LocalMirror(f"gs://{gcs_bucket}/mirror/failed") as m:
    open(os.path.join(m.local, "partial.txt"), "w").write("p")
    raise RuntimeError("the writer failed")
  assert not storage.path(f"gs://{gcs_bucket}/mirror/failed").exists() and not os.path.exists(m.local)
  local = storage.LocalMirror(str(tmp_path / "here"))
  assert local.local == str(tmp_path / "here")  # a local directory is its own mirror
  (tmp_path / "here").mkdir()
  (tmp_path / "here" / "f.txt").write_text("f")
  local.close()
  assert (tmp_path / "here" / "f.txt").read_text() == "f"  # ... which close leaves in place
