"""`run.py convert` / `run.py predict` as a user runs them: outputs, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from evf_jax import cli
from evf_jax.errors import UserError
from evf_jax.evf import EvfConfig
from evf_jax.predictor import Predictor
from evf_testing import evf_reference as ref
from evf_testing.images import smooth_image
from evf_testing.spm_model import train as train_spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling is the cost


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  spm = train_spm(str(d / "spm"), "bpe")
  config = EvfConfig.preset("tiny")
  model = ref.build_torch_evf(config, 3)
  return ref.write_hf_directory(model, config, os.path.join(spm, "sentencepiece.bpe.model"), str(d / "hf"))


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ckpt") / "evf_tiny")
  assert cli.main(["convert", "--src", hf_dir, "--out", out]) == 0
  return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
  p = str(tmp_path_factory.mktemp("img") / "scene.jpg")
  Image.fromarray(smooth_image(70, 100, 5)).save(p, quality=95)
  return p


def _error_line(capsys, argv, stdout: list | None = None) -> str:
  code = cli.main(argv)
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert code == 2, err
  assert err and err[0].startswith("error: "), err
  assert "Traceback" not in "\n".join(err)
  if stdout is not None:
    stdout.append(captured.out)
  return err[0]


# convert

def test_convert_writes_checkpoint_with_provenance(ckpt):
  for name in ("model_config.json", "provenance.json", "params", "tokenizer/sentencepiece.bpe.model"):
    assert os.path.exists(os.path.join(ckpt, name)), name
  prov = json.load(open(os.path.join(ckpt, "provenance.json")))
  assert len(prov["source_files"]["model.safetensors"]) == 64
  assert prov["converter"]["rules_version"] >= 1
  assert json.load(open(os.path.join(ckpt, "model_config.json")))["model_type"] == "evf"


def test_convert_refuses_to_overwrite(ckpt, hf_dir, tmp_path, capsys):
  line = _error_line(capsys, ["convert", "--src", hf_dir, "--out", ckpt])
  assert "--overwrite" in line
  user_dir = tmp_path / "mine"
  user_dir.mkdir()
  (user_dir / "notes.txt").write_text("keep me")
  line = _error_line(capsys, ["convert", "--src", hf_dir, "--out", str(user_dir), "--overwrite"])
  assert "not an evf-jax checkpoint" in line
  # Without --overwrite: not told to pass it, since it would be refused all the same.
  line = _error_line(capsys, ["convert", "--src", hf_dir, "--out", str(user_dir)])
  assert "not an evf-jax checkpoint" in line and "pass --overwrite" not in line, line
  assert (user_dir / "notes.txt").read_text() == "keep me"


def test_convert_out_under_a_file_is_refused_before_reading(hf_dir, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("x")
  out = []
  line = _error_line(capsys, ["convert", "--src", hf_dir, "--out", str(afile / "x")], out)
  assert f"{afile} is a file" in line, line
  assert "reading weights" not in out[0]


def test_convert_overwrite_replaces_a_checkpoint(hf_dir, tmp_path):
  out = str(tmp_path / "c")
  assert cli.main(["convert", "--src", hf_dir, "--out", out]) == 0
  stamp = os.path.getmtime(os.path.join(out, "provenance.json"))
  assert cli.main(["convert", "--src", hf_dir, "--out", out, "--overwrite", "--precision", "bf16"]) == 0
  assert json.load(open(os.path.join(out, "model_config.json")))["param_dtype"] == "bfloat16"
  assert os.path.getmtime(os.path.join(out, "provenance.json")) >= stamp
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


def test_convert_overwrite_keeps_the_users_other_files(ckpt, hf_dir, tmp_path, capsys):
  """A checkpoint directory that also holds the user's files is refused before any work, --overwrite or not (the
  replacement would delete them); one holding only a checkpoint's files is replaced (the test above)."""
  out = tmp_path / "c"
  shutil.copytree(ckpt, out)
  (out / "notes.txt").write_text("keep me")
  for extra in ([], ["--overwrite"]):
    stdout = []
    line = _error_line(capsys, ["convert", "--src", hf_dir, "--out", str(out), *extra], stdout)
    assert "holds notes.txt, which an evf-jax checkpoint directory does not" in line, line
    assert "pass --overwrite" not in line and "reading weights" not in stdout[0]
  assert (out / "notes.txt").read_text() == "keep me" and (out / "model_config.json").is_file()


def test_convert_overwrite_through_a_symbolic_link(ckpt, hf_dir, tmp_path):
  """--out a link to a checkpoint: the directory it names is replaced, the link kept, nothing left behind."""
  (tmp_path / "real").mkdir()
  target = tmp_path / "real" / "c"
  shutil.copytree(ckpt, target)
  (tmp_path / "links").mkdir()
  link = tmp_path / "links" / "c"
  link.symlink_to(target)
  assert cli.main(["convert", "--src", hf_dir, "--out", str(link), "--overwrite", "--precision", "bf16"]) == 0
  assert link.is_symlink() and os.readlink(link) == str(target)
  assert json.load(open(target / "model_config.json"))["param_dtype"] == "bfloat16"
  assert os.listdir(tmp_path / "links") == ["c"] and os.listdir(tmp_path / "real") == ["c"]


@pytest.mark.parametrize("damage,expect", [
    ("no_config", "config.json is missing"),
    ("other_type", "model_type is 'sam2'"),
    ("no_tokenizer", "sentencepiece.bpe.model"),
    ("junk_tokenizer", "sentencepiece.bpe.model: not a sentencepiece model"),
    ("empty_tokenizer", "sentencepiece.bpe.model: not a sentencepiece model"),
    ("config_a_list", "config.json: expected a JSON object, found list"),
    ("config_a_string", "config.json: expected a JSON object, found str"),
    ("index_a_list", "model.safetensors.index.json: not a valid shard index"),
    ("no_weights", "no weights found"),
    ("wrong_scale", "released sizes"),
])
def test_convert_bad_sources(hf_dir, tmp_path, capsys, damage, expect):
  src = str(tmp_path / "src")
  shutil.copytree(hf_dir, src)
  cfg_path = os.path.join(src, "config.json")
  cfg = json.load(open(cfg_path))
  if damage == "no_config":
    os.remove(cfg_path)
  elif damage == "other_type":
    json.dump(dict(cfg, model_type="sam2"), open(cfg_path, "w"))
  elif damage == "no_tokenizer":
    os.remove(os.path.join(src, "sentencepiece.bpe.model"))
  elif damage in ("junk_tokenizer", "empty_tokenizer"):  # copied as is, it would fail at the first predict
    with open(os.path.join(src, "sentencepiece.bpe.model"), "w") as f:
      f.write("not a model" if damage == "junk_tokenizer" else "")
  elif damage in ("config_a_list", "config_a_string"):
    with open(cfg_path, "w") as f:
      json.dump([1, 2] if damage == "config_a_list" else "x", f)
  elif damage == "index_a_list":
    os.remove(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
      json.dump([1, 2], f)
  elif damage == "no_weights":
    os.remove(os.path.join(src, "model.safetensors"))
  elif damage == "wrong_scale":
    json.dump(dict(cfg, sam_scale="base", hidden_size=32, out_dim=256), open(cfg_path, "w"))
  out = str(tmp_path / "out")
  line = _error_line(capsys, ["convert", "--src", src, "--out", out])
  assert expect in line, line
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_convert_extra_and_missing_keys_are_all_listed(hf_dir, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  src = str(tmp_path / "src")
  shutil.copytree(hf_dir, src)
  sd = load_file(os.path.join(src, "model.safetensors"))
  sd["head.weight"] = np.zeros((2, 2), np.float32)
  del sd["text_hidden_fcs.0.2.bias"]
  save_file(sd, os.path.join(src, "model.safetensors"))
  code = cli.main(["convert", "--src", src, "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2
  assert "2 problem(s)" in err.splitlines()[0]
  assert "'head.weight'" in err and "'projector/fc2/bias'" in err


def test_convert_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  line = _error_line(capsys, ["convert", "--src", "YxZhang/evf-sam", "--out", str(tmp_path / "o")])
  assert "cannot download 'YxZhang/evf-sam'" in line


@pytest.mark.parametrize("src", ["./nope", "../nope", "~/nope-evf-jax", "/nope/evf", "models/evf/sam", "nope/"])
def test_convert_missing_path_is_not_a_hub_id(tmp_path, capsys, monkeypatch, src):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  line = _error_line(capsys, ["convert", "--src", src, "--out", str(tmp_path / "o")])
  assert line == f"error: --src {src}: no such directory", line


# predict

def test_predict_writes_masks_overlays_and_logits(ckpt, image_file, tmp_path, capsys):
  out = tmp_path / "pred"
  prompts = ["zebra top left", "[semantic] sky"]
  argv = ["predict", "--checkpoint", ckpt, "--image", image_file, "--out-dir", str(out), "--save-logits"]
  for p in prompts:
    argv += ["--prompt", p]
  assert cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and "mask area" in lines[0] and "score" in lines[1]
  p = Predictor.from_checkpoint(ckpt)
  img = np.asarray(Image.open(image_file).convert("RGB"))
  p.set_image(img)
  want = p.predict(prompts)
  for i in range(2):
    mask = np.asarray(Image.open(out / f"scene_{i}_mask.png"))
    assert mask.shape == img.shape[:2] and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, want.masks[i])
    logits = np.load(out / f"scene_{i}_logits.npy")
    assert logits.dtype == np.float32 and logits.shape == img.shape[:2]
    np.testing.assert_allclose(logits, want.logits[i], atol=1e-6)
    vis = np.asarray(Image.open(out / f"scene_{i}_vis.png"))
    m = want.masks[i]
    np.testing.assert_array_equal(vis[~m], img[~m])
    if m.any():
      np.testing.assert_array_equal(vis[m], (img[m] * 0.5 + np.array([50, 120, 220]) * 0.5).astype(np.uint8))
  # The same run again: the outputs exist, so it stops before loading anything unless told to replace them.
  before = (out / "scene_0_mask.png").read_bytes()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{out / 'scene_0_mask.png'} exists" in err[0] and "--overwrite" in err[0], err
  assert (out / "scene_0_mask.png").read_bytes() == before
  assert cli.main(argv + ["--overwrite"]) == 0


def test_predict_overwrite_leaves_no_stale_outputs(ckpt, image_file, tmp_path, capsys):
  """--overwrite with fewer prompts and no --save-logits: the image's earlier masks, overlays and logits that this
  run does not write go too; another image's outputs and the user's files stay. --skip-existing does the same
  for the images it predicts again."""
  out = tmp_path / "pred"
  argv = ["predict", "--checkpoint", ckpt, "--image", image_file, "--out-dir", str(out)]
  assert cli.main(argv + ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--save-logits"]) == 0
  mine = ["notes.txt", "scene_0_mask.png.bak", "scene_x_mask.png", "scenery_0_mask.png", "other_0_logits.npy"]
  for name in mine:
    (out / name).write_text("the user's")
  assert cli.main(argv + ["--prompt", "a", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == sorted(mine + ["scene_0_mask.png", "scene_0_vis.png"])
  assert cli.main(argv + ["--prompt", "a", "--prompt", "b", "--save-logits", "--overwrite"]) == 0
  (out / "scene_0_vis.png").unlink()  # as a stopped run leaves it
  assert cli.main(argv + ["--prompt", "a", "--skip-existing"]) == 0  # scene is not all there: predicted again
  assert sorted(os.listdir(out)) == sorted(mine + ["scene_0_mask.png", "scene_0_vis.png"])
  capsys.readouterr()


def test_predict_several_images_and_a_directory(ckpt, image_file, tmp_path, capsys):
  """One model load for every image: files and a directory's images (by name; other files, hidden files and
  folders ignored; a file named twice read once), each with every prompt, equal to predicting them one at a
  time."""
  folder = tmp_path / "folder"
  folder.mkdir()
  Image.fromarray(smooth_image(90, 60, 6)).save(folder / "b.png")
  Image.fromarray(smooth_image(50, 130, 7)).save(folder / "a.jpg", quality=95)
  (folder / "notes.txt").write_text("not an image, not read")
  (folder / "._a.jpg").write_bytes(b"macOS metadata, not an image")
  (folder / "sub.jpg").mkdir()
  out = tmp_path / "pred"
  prompts = ["zebra top left", "[semantic] sky"]
  argv = ["predict", "--checkpoint", ckpt, "--image", image_file, str(folder), "--out-dir", str(out),
          "--prompt", prompts[0], "--prompt", prompts[1], "--image", image_file]
  assert cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line for line in lines if line.endswith(":")] == [f"{image_file}:", f"{folder / 'a.jpg'}:",
                                                           f"{folder / 'b.png'}:"]
  assert len(lines) == 3 * 3 + 1 and lines[-1].startswith("3 images x 2 prompts")
  p = Predictor.from_checkpoint(ckpt)
  for path in (image_file, folder / "a.jpg", folder / "b.png"):
    img = np.asarray(Image.open(path).convert("RGB"))
    p.set_image(img)
    want = p.predict(prompts)
    stem = os.path.splitext(os.path.basename(path))[0]
    for i in range(2):
      np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}_{i}_mask.png")) > 0, want.masks[i])
  assert sorted(os.listdir(out)) == sorted(f"{s}_{i}_{k}.png" for s in ("scene", "a", "b") for i in range(2)
                                           for k in ("mask", "vis"))


def test_predict_several_images_checked_before_the_model_loads(ckpt, image_file, tmp_path, capsys):
  (tmp_path / "d1").mkdir()
  (tmp_path / "d2").mkdir()
  (tmp_path / "empty").mkdir()
  Image.fromarray(smooth_image(40, 40, 1)).save(tmp_path / "d1" / "x.png")
  Image.fromarray(smooth_image(40, 40, 2)).save(tmp_path / "d2" / "x.jpg")
  (tmp_path / "notes.png").write_text("this is not an image")
  out = tmp_path / "o"
  base = ["predict", "--checkpoint", str(tmp_path / "no-model"), "--prompt", "cat", "--out-dir", str(out)]
  # Each is found before the (missing) checkpoint is read, and nothing is written.
  Image.fromarray(smooth_image(40, 40, 3)).save(tmp_path / "X.jpg")
  for images, expect in ((["d1", "d2"], "would write the same files (x_<i>_mask.png"),
                         (["d1/x.png", "X.jpg"], "would write the same files"),  # one file where case is ignored
                         (["d1/x.png", "notes.png"], "not an image"),
                         (["empty"], "a directory with no images")):
    line = _error_line(capsys, base + ["--image", *[str(tmp_path / i) for i in images]])
    assert expect in line, line
  assert not out.exists()
  line = _error_line(capsys, base[:-1] + [str(tmp_path / "d1"), "--image", str(tmp_path / "d1")])
  assert "is an --image directory" in line, line  # a rerun would read the masks as images


@pytest.mark.parametrize("flag", [None, "--overwrite", "--skip-existing"])
def test_predict_output_name_taken_by_a_directory(image_file, tmp_path, capsys, flag):
  """A directory where an output file goes is refused before the model loads (the checkpoint is not even read);
  replacing or keeping it would not help."""
  out = tmp_path / "o"
  (out / "scene_0_vis.png").mkdir(parents=True)
  argv = ["predict", "--checkpoint", str(tmp_path / "no-model"), "--image", image_file, "--prompt", "cat",
          "--out-dir", str(out)] + ([flag] if flag else [])
  line = _error_line(capsys, argv)
  assert line == f"error: {out / 'scene_0_vis.png'} is a directory where this run writes a file; move it out of " \
                 "the way or choose another --out-dir", line
  assert os.listdir(out) == ["scene_0_vis.png"]


def test_predict_keeps_the_images_done_when_a_later_one_is_corrupt(ckpt, image_file, tmp_path, capsys):
  """A file whose header reads but whose pixels are cut off fails when it is decoded, in its turn: one line, and
  the images before it keep their outputs."""
  full = tmp_path / "full.png"
  Image.fromarray(smooth_image(64, 64, 3)).save(full)
  cut = tmp_path / "z_cut.png"
  cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
  out = tmp_path / "o"
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", image_file, str(cut), "--prompt", "cat",
                              "--out-dir", str(out)])
  assert "cannot decode image" in line and "z_cut.png" in line, line
  assert sorted(os.listdir(out)) == ["scene_0_mask.png", "scene_0_vis.png"]


def test_a_failed_predict_leaves_no_empty_out_dir(ckpt, tmp_path, capsys):
  """The folders predict made are removed again when it fails before writing anything (here: the only image is
  cut off), and one it cannot create is one line."""
  full = tmp_path / "full.png"
  Image.fromarray(smooth_image(64, 64, 3)).save(full)
  cut = tmp_path / "cut.png"
  cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
  base = ["predict", "--checkpoint", ckpt, "--image", str(cut), "--prompt", "cat", "--out-dir"]
  assert "cannot decode image" in _error_line(capsys, base + [str(tmp_path / "o" / "sub")])
  assert not os.path.exists(tmp_path / "o")
  line = _error_line(capsys, base[:4] + [str(full)] + base[5:] + [str(tmp_path / "o" / ("x" * 300))])
  assert f"{'x' * 300}: cannot create it (File name too long)" in line, line
  assert not os.path.exists(tmp_path / "o")


def test_predict_skip_existing_continues_an_interrupted_run(ckpt, tmp_path, capsys):
  """Files are written whole (hidden `.partial`, then renamed), so after a kill an image is done exactly when all
  its outputs exist: --skip-existing keeps those and predicts the rest, replacing their partial outputs."""
  folder = tmp_path / "in"
  folder.mkdir()
  for k, name in enumerate(("a.png", "b.png", "c.png")):
    Image.fromarray(smooth_image(40 + 10 * k, 50, k)).save(folder / name)
  out = tmp_path / "out"
  argv = ["predict", "--checkpoint", ckpt, "--image", str(folder), "--prompt", "cat", "--prompt", "dog",
          "--out-dir", str(out)]
  assert cli.main(argv) == 0
  first = {n: (out / n).read_bytes() for n in os.listdir(out)}
  assert len(first) == 3 * 2 * 2
  a_times = {n: (out / n).stat().st_mtime_ns for n in first if n.startswith("a_")}
  # As a kill would leave it: b without its last file, c with nothing but a partial one.
  (out / "b_1_vis.png").unlink()
  for n in [n for n in first if n.startswith("c_")]:
    (out / n).unlink()
  (out / ".c_0_mask.png.partial").write_bytes(b"cut off")
  capsys.readouterr()
  line = _error_line(capsys, argv)
  assert "--skip-existing to keep the images done" in line, line
  assert cli.main(argv + ["--skip-existing"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [x for x in lines if x.endswith(":")] == [f"{folder / 'b.png'}:", f"{folder / 'c.png'}:"]
  assert lines[-1].endswith("(1 of them done before, kept)")
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == first  # no partial file left
  assert {n: (out / n).stat().st_mtime_ns for n in a_times} == a_times  # a was not written again
  # Everything done: nothing is loaded (the checkpoint need not even exist).
  done = ["predict", "--checkpoint", str(tmp_path / "gone"), *argv[3:], "--skip-existing"]
  assert cli.main(done) == 0
  assert "nothing to predict" in capsys.readouterr().out
  assert "choose one" in _error_line(capsys, argv + ["--skip-existing", "--overwrite"])
  assert "is for images" in _error_line(capsys, ["predict", "--checkpoint", ckpt, "--video", str(folder), "--prompt",
                                                 "cat", "--out-dir", str(tmp_path / "v"), "--skip-existing"])


def _bad_files(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("this is not an image")
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  full = tmp_path / "full.jpg"
  Image.fromarray(smooth_image(64, 64)).save(full)
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(full.read_bytes()[:400])
  thin = tmp_path / "thin.png"  # valid, but SAM's longest-side resize would make it 0 pixels high
  Image.new("RGB", (5000, 1)).save(thin)
  return {"thin": (str(thin), "5000x1: too thin for this model"),
          "missing": (str(tmp_path / "nope.jpg"), "image not found"),
          "not_image": (str(text), "not an image"),
          "zero_size": (str(empty), "empty (0 bytes)"),
          "truncated": (str(truncated), "cannot decode image")}


@pytest.mark.parametrize("kind", ["missing", "not_image", "zero_size", "truncated", "thin"])
def test_predict_bad_image(ckpt, tmp_path, capsys, kind):
  path, expect = _bad_files(tmp_path)[kind]
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", path, "--prompt", "cat",
                              "--out-dir", str(tmp_path / "o")])
  assert expect in line and os.path.basename(path) in line


@pytest.mark.parametrize("prompt,expect", [("", "is empty"), ("   \t", "is empty"),
                                           ("[semantic] ", "is only the [semantic] tag")])
def test_predict_empty_prompt(ckpt, image_file, tmp_path, capsys, prompt, expect):
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat",
                              "--prompt", prompt, "--out-dir", str(tmp_path / "o")])
  assert f"--prompt 2 {expect}" in line


def test_predict_long_prompt_is_truncated_with_a_warning(ckpt, image_file, tmp_path, capsys):
  long_prompt = " ".join(["the man on the left"] * 40)
  with pytest.warns(UserWarning, match="truncated"):
    code = cli.main(["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", long_prompt,
                     "--max-text-len", "16", "--out-dir", str(tmp_path / "o")])
  assert code == 0
  assert os.path.exists(tmp_path / "o" / "scene_0_mask.png")


@pytest.mark.parametrize("flags,expect", [
    (["--attention", "cudnn"], "cuDNN attention needs precision bf16 or fp16"),
    (["--attention", "cudnn", "--precision", "bf16"], "attention cudnn needs an NVIDIA GPU; jax is running on cpu"),
])
def test_predict_attention_choice_is_checked_first(ckpt, image_file, tmp_path, capsys, flags, expect):
  """cuDNN attention in fp32, or without a GPU, is a one-line error before anything is loaded or written
  (jax would otherwise fail inside the first call's trace)."""
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat",
                              "--out-dir", str(tmp_path / "o")] + flags)
  assert expect in line
  assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="fp16 runs off the CPU")
def test_fp16_on_cpu_is_one_line_before_loading(ckpt, image_file, tmp_path, capsys):
  """XLA:CPU has no float16 products: jax would fail inside the first call's compile."""
  from evf_jax.checkpoints import load_checkpoint
  from evf_jax.errors import UserError
  expect = "fp16 needs a GPU (XLA:CPU has no float16 products); use bf16 or fp32 on CPU"
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat",
                              "--out-dir", str(tmp_path / "o"), "--precision", "fp16"])
  assert line == f"error: {expect}"
  assert not os.path.exists(tmp_path / "o")
  with pytest.raises(UserError, match=r"fp16 needs a GPU"):
    Predictor.from_checkpoint(str(tmp_path / "not_read"), precision="fp16")  # before the checkpoint is read
  with pytest.raises(UserError, match=r"fp16 needs a GPU"):
    Predictor(*load_checkpoint(ckpt), precision="fp16")


def test_predict_bad_out_dir_before_any_work(ckpt, image_file, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  base = ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat"]
  out = []  # nothing predicted before the refusal
  assert f"{afile} is a file" in _error_line(capsys, base + ["--out-dir", str(afile / "sub")], out)
  assert "--out-dir is empty" in _error_line(capsys, base + ["--out-dir", ""], out)
  assert "is a file" in _error_line(capsys, base + ["--out-dir", str(afile)], out)
  assert afile.read_text() == "keep me" and out == ["", "", ""]


@pytest.mark.parametrize("n", ["0", "2", "1023", "5000"])
def test_predict_max_text_len_out_of_range(ckpt, image_file, tmp_path, capsys, n):
  line = _error_line(capsys, ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat",
                              "--max-text-len", n, "--out-dir", str(tmp_path / "o")])
  assert f"max text length {n}: expected 3 (<s>, a token and </s>) to 1022" in line, line
  assert not os.path.exists(tmp_path / "o")


def test_predictor_prompts_any_iterable_and_non_str(ckpt, image_file):
  from evf_jax.predictor import PromptError
  p = Predictor.from_checkpoint(ckpt)
  p.set_image(np.asarray(Image.open(image_file).convert("RGB")))
  want = p.predict(["cat", "dog"])
  got = p.predict(x for x in ["cat", "dog"])  # a generator is read once, not used up by the checks
  np.testing.assert_array_equal(got.logits, want.logits)
  with pytest.raises(PromptError, match="prompt 1 is a NoneType, not a str"):
    p.predict(["cat", None])
  with pytest.raises(PromptError, match="prompt 0 is empty"):
    p.predict(["  "])
  with pytest.raises(UserError, match="the image is 5000x1: too thin"):  # not PIL's ValueError from the resize
    p.set_image(np.zeros((1, 5000, 3), np.uint8))


def test_outputs_inside_a_checkpoint_are_refused(ckpt, hf_dir, image_file, tmp_path, capsys):
  """predict --out-dir, export-hf --out and convert --out inside a checkpoint or a run's export/ or checkpoints/
  were accepted; the next convert --overwrite, export or training run replaced that folder whole, outputs and all."""
  model, workdir = tmp_path / "model", tmp_path / "w"
  shutil.copytree(ckpt, model)
  shutil.copytree(ckpt, workdir / "export")
  (workdir / "config.json").write_text("{}")  # a training workdir: its config and its lock file
  (workdir / "run.lock").write_text("")
  project = tmp_path / "project"  # names common elsewhere are no workdir or checkpoint: accepted
  (project / "checkpoints").mkdir(parents=True)
  for name in ("config.json", "model_config.json"):
    (project / name).write_text("{}")
  before = sorted(os.listdir(model))
  predict = ["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat", "--out-dir"]
  cases = ((predict + [str(model)], f"--out-dir {model} is the evf-jax checkpoint {model}, which"),
           (predict + [str(model / "preds")], f"is inside the evf-jax checkpoint {model}, which"),
           (predict + [str(workdir / "export" / "preds")], f"is in the run's export/ of {workdir}, which"),
           (predict + [str(workdir / "checkpoints" / "preds")], f"is in the run's checkpoints/ of {workdir}, which"),
           (["export-hf", "--checkpoint", ckpt, "--out", str(model / "hf")], "is inside the evf-jax checkpoint"),
           (["convert", "--src", hf_dir, "--out", str(model / "params" / "x")], "is inside the evf-jax checkpoint"))
  for argv, expect in cases:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], (argv, err)
  assert sorted(os.listdir(model)) == before == sorted(os.listdir(workdir / "export"))
  assert not (workdir / "checkpoints").exists()
  from evf_jax.train import checkpointing
  checkpointing.check_not_in_a_model(str(project / "checkpoints" / "evf-sam"), "--out", itself=False)
  checkpointing.check_not_in_a_model(str(project / "preds"), "--out-dir")


def test_a_model_config_with_bad_values_is_one_line(ckpt, image_file, tmp_path, capsys):
  """model_config.json edited by hand: a string for a count, a negative or zero size, a NaN, a list of the wrong
  length. Each was a traceback from inside the model (or a model of negative size); now one line, before the
  weights load. Top-level keys too: a misspelt or unknown key, a changed copy of a part's size (hidden_size is
  BEiT-3's embed_dim) and an unknown param_dtype were ignored, the last read as float32."""
  invalid = "model_config.json is not a valid EVF-SAM config"
  cases = ((("beit3", "num_layers"), "two", f"{invalid} (num_layers: expected an int, got 'two')"),
           (("sam", "img_size"), -128, "img_size: must be >= 1, got -128"),
           (("sam", "decoder_depth"), 0, "decoder_depth: must be >= 1, got 0"),
           (("sam", "mlp_ratio"), float("nan"), "mlp_ratio: expected a finite number, got nan"),
           (("sam", "pixel_mean"), [1.0, 2.0], "pixel_mean: expected 3 values, got 2"),
           ((None, "sam_scal"), "huge", f"{invalid} (unknown EvfConfig fields: ['sam_scal'])"),
           ((None, "hidden_size"), 4096, f"{invalid} (hidden_size=4096 does not fit the rest of the config, which "
                                         "gives 32)"),
           ((None, "param_dtype"), "float16", "model_config.json has param_dtype 'float16'; expected one of "
                                              "['bfloat16', 'float32']"))
  for (part, field), value, expect in cases:
    bad = tmp_path / f"{part}_{field}"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "model_config.json").read_text())
    (config[part] if part else config)[field] = value
    (bad / "model_config.json").write_text(json.dumps(config))
    code = cli.main(["predict", "--checkpoint", str(bad), "--image", image_file, "--prompt", "cat", "--out-dir",
                     str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{bad}: " in err[0] and expect in err[0], err


def test_predictor_api_mistakes_are_clear_errors(ckpt, image_file):
  """Library mistakes that gave silent wrong answers or deep tracebacks: ids past the vocabulary (jax's gather
  reads them as NaN: NaN scores, empty masks), float ids, a failed set_image (the image before stayed set), a path
  for an array, bytes or None for prompts, text the tokenizer drops entirely, a bad size_multiple. Logits are
  writable copies."""
  from evf_jax.images import ImageReadError
  from evf_jax.predictor import PromptError
  p = Predictor.from_checkpoint(ckpt)
  image = np.asarray(Image.open(image_file).convert("RGB"))
  p.set_image(image)
  vocab = p.config.beit3.vocab_size
  ids, mask = np.array([[0, 5, 2]]), np.ones((1, 3), bool)
  assert np.isfinite(p.predict_tokens(ids, mask).scores).all()
  for bad, expect in (([[0, vocab, 2]], rf"must lie in \[0, {vocab}\)"), ([[0, -5, 2]], "must lie in"),
                      ([[0.0, 5.0, 2.0]], "must be integers")):
    with pytest.raises(PromptError, match=expect):
      p.predict_tokens(np.array(bad), mask)
  too_long = p.config.beit3.max_text_len + 1
  with pytest.raises(PromptError, match="text positions"):
    p.predict_tokens(np.zeros((1, too_long), np.int32), np.ones((1, too_long), bool))
  for prompts, expect in ((b"dog", "a str or an iterable of str, got a bytes"), (None, "got a NoneType"),
                          (5, "got a int"), (["cat", "\x01\x02"], "prompt 1 has no text the tokenizer keeps")):
    with pytest.raises(PromptError, match=expect):
      p.predict(prompts)
  result = p.predict(["cat"])
  result.logits *= 2  # a writable array of its own
  with pytest.raises(ImageReadError, match="got a str: read a file with evf_jax.load_image"):
    p.set_image(image_file)
  with pytest.raises(UserError, match="no image set"):  # not the earlier image's answer
    p.predict(["cat"])
  from evf_jax.checkpoints import load_checkpoint
  config, params, tokenizer = load_checkpoint(ckpt)
  for multiple in (0, -8, 2.5):
    with pytest.raises(UserError, match="size_multiple must be a positive int"):
      Predictor(config, params, tokenizer, size_multiple=multiple)


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(ckpt, tmp_path):
  """A tokenizer with more ids than BEiT-3's embedding table (another model's) made NaN results for the prompts
  that use the extra ids: refused at the load, and by the Predictor's constructor."""
  from evf_jax.checkpoints import ModelDirError, load_checkpoint
  config, params, tokenizer = load_checkpoint(ckpt)
  small = dataclasses.replace(config, beit3=dataclasses.replace(config.beit3, vocab_size=tokenizer.vocab_size - 1))
  with pytest.raises(UserError, match=f"the tokenizer has {tokenizer.vocab_size} ids, more than this model's"):
    Predictor(small, params, tokenizer)
  copy = tmp_path / "small_vocab"
  shutil.copytree(ckpt, copy)
  raw = json.loads((copy / "model_config.json").read_text())
  raw["beit3"]["vocab_size"] = tokenizer.vocab_size - 1
  (copy / "model_config.json").write_text(json.dumps(raw))
  with pytest.raises(ModelDirError, match=f"^{copy}: the tokenizer has {tokenizer.vocab_size} ids"):
    load_checkpoint(str(copy))


def test_save_model_round_trip_and_mistakes(ckpt, tmp_path):
  """`save_model` from Python: a config object and the tokenizer make a directory `load_checkpoint` reads back;
  a config without a known model_type and a directory that holds a checkpoint are refused before any write
  (they left a params/ without config, or failed in orbax)."""
  from evf_jax.checkpoints import load_checkpoint, save_model
  from evf_jax.tokenizer import SPM_FILE
  config, params, tokenizer = load_checkpoint(ckpt)
  out = tmp_path / "saved"
  save_model(str(out), params, config, tokenizer_files={SPM_FILE: tokenizer.model_file})
  config2, params2, tokenizer2 = load_checkpoint(str(out))
  assert config2 == config and tokenizer2.encode("a dog") == tokenizer.encode("a dog")
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  before = sorted(os.listdir(out))
  with pytest.raises(UserError, match="already holds a checkpoint"):
    save_model(str(out), params, config)
  assert sorted(os.listdir(out)) == before
  with pytest.raises(UserError, match="model_type None is not one of"):
    save_model(str(tmp_path / "bad"), params, {"sam_scale": "tiny"})
  assert not (tmp_path / "bad").exists()


def test_predict_attention_xla(ckpt, image_file, tmp_path, capsys):
  code = cli.main(["predict", "--checkpoint", ckpt, "--image", image_file, "--prompt", "cat", "--attention", "xla",
                   "--out-dir", str(tmp_path / "o")])
  assert code == 0, capsys.readouterr().err
  assert os.path.exists(tmp_path / "o" / "scene_0_mask.png")


def test_predictor_checks_precision_and_attention(ckpt):
  from evf_jax.errors import UserError
  from evf_jax.checkpoints import load_checkpoint
  config, params, tokenizer = load_checkpoint(ckpt)
  for kw, expect in ((dict(precision="fp32", attention="cudnn"), "needs precision bf16 or fp16"),
                     (dict(precision="fp64"), "precision 'fp64'"),
                     (dict(precision="bf16", attention="flash"), "attention 'flash'")):
    with pytest.raises(UserError, match=expect):
      Predictor(config, params, tokenizer, **kw)


@pytest.mark.parametrize("damage,expect", [
    ("no_config", "model_config.json is missing"),
    ("no_params", "weights (params/) are missing"),
    ("no_tokenizer", "no sentencepiece model"),
    ("other_type", "holds model_type 'sam2'"),
    ("not_a_dir", "no such checkpoint directory"),
    ("a_file", "a file, not a checkpoint directory"),
    ("wrong_size", "model_config.json does not fit the weights: beit3/"),
])
def test_predict_bad_checkpoint(ckpt, image_file, tmp_path, capsys, damage, expect):
  bad = str(tmp_path / "ckpt")
  shutil.copytree(ckpt, bad)
  if damage == "no_config":
    os.remove(os.path.join(bad, "model_config.json"))
  elif damage == "no_params":
    shutil.rmtree(os.path.join(bad, "params"))
  elif damage == "no_tokenizer":
    shutil.rmtree(os.path.join(bad, "tokenizer"))
  elif damage == "other_type":
    cfg = json.load(open(os.path.join(bad, "model_config.json")))
    json.dump(dict(cfg, model_type="sam2"), open(os.path.join(bad, "model_config.json"), "w"))
  elif damage == "not_a_dir":
    bad = str(tmp_path / "missing_ckpt")
  elif damage == "a_file":  # e.g. the weights file passed instead of its folder
    bad = os.path.join(bad, "model_config.json")
  elif damage == "wrong_size":  # sizes edited by hand: flax would fail at the first call
    cfg = json.load(open(os.path.join(bad, "model_config.json")))
    cfg["beit3"]["embed_dim"] += 8
    cfg["hidden_size"] = cfg["beit3"]["embed_dim"]  # its copy, kept in step
    json.dump(cfg, open(os.path.join(bad, "model_config.json"), "w"))
  line = _error_line(capsys, ["predict", "--checkpoint", bad, "--image", image_file, "--prompt", "cat",
                              "--out-dir", str(tmp_path / "o")])
  assert expect in line


def test_run_py_exit_code_and_no_traceback(tmp_path):
  r = subprocess.run([sys.executable, "run.py", "predict", "--checkpoint", str(tmp_path), "--image",
                      str(tmp_path / "missing.png"), "--prompt", "cat", "--out-dir", str(tmp_path / "o")],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.png'}"]


def test_predict_image_flag_mistakes_are_one_line(image_file, tmp_path, capsys):
  """--chunk with --image was silently ignored; a second --image that does not exist but shares a stem with the
  first (a typo in case) was reported as a name clash. Both before the checkpoint is read."""
  head, name = os.path.split(image_file)
  typo = os.path.join(head, name.upper())
  base = ["predict", "--checkpoint", str(tmp_path / "none"), "--prompt", "cat", "--out-dir", str(tmp_path / "o")]
  for extra, expect in ((["--image", image_file, "--chunk", "8"], "error: --chunk is for --video"),
                        (["--image", image_file, typo], f"error: image not found: {typo}")):
    assert cli.main(base + extra) == 2
    assert capsys.readouterr().err.strip() == expect


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, capsys):
  """Bytes the shell could not decode reach Python as surrogates; sentencepiece raised a traceback on them after
  the model had loaded."""
  out = tmp_path / "o"
  code = cli.main(["predict", "--checkpoint", str(tmp_path), "--image", "i.png", "--prompt", "zebra",
                   "--prompt", "zebra \udcff", "--out-dir", str(out)])
  assert code == 2 and capsys.readouterr().err.strip() == "error: --prompt 2 is not valid UTF-8 text"
  assert not out.exists()


@pytest.mark.parametrize("argv,expect", [
    (["eval", "--checkpoint", "c", "--data", "d", "--split", "s", "--batch-size", "x"],
     "error: run.py eval: argument --batch-size: invalid int value: 'x' (see run.py eval --help)"),
    (["predict"], "error: run.py predict: the following arguments are required: --checkpoint, --prompt, "
                  "--out-dir (see run.py predict --help)"),
    (["bogus"], "error: run.py: argument COMMAND: invalid choice: 'bogus'"),
    (["predict", "--checkpoint", "c", "--image", "i", "--prompt", "p", "--out-dir", "o", "--compilation-cache", ""],
     "error: run.py predict: argument --compilation-cache: is empty"),  # it would silently run without a cache
    (["predict", "--checkpoint", "", "--image", "i", "--prompt", "p", "--out-dir", "o"],
     "error: run.py predict: argument --checkpoint: is empty"),  # was "error: : not a converted ..."
    (["convert", "--src", " ", "--out", "o"], "error: run.py convert: argument --src: is empty"),
    (["export-hf", "--checkpoint", "", "--out", "o"], "error: run.py export-hf: argument --checkpoint: is empty"),
    # an unset variable (--out "$OUT"): was the current directory, replaced with --overwrite
    (["convert", "--src", "s", "--out", ""], "error: run.py convert: argument --out: is empty"),
    (["export-hf", "--checkpoint", "c", "--out", "  "], "error: run.py export-hf: argument --out: is empty"),
])
def test_argument_mistakes_are_one_line(capsys, argv, expect):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith(expect), err


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_model_bin"])
def test_convert_other_weight_layouts(hf_dir, ckpt, tmp_path, layout):
  """Sharded safetensors with an index, and pytorch_model.bin (read with weights_only=True), give the
  same params as the single model.safetensors."""
  import torch
  from safetensors.numpy import load_file, save_file

  from evf_jax import checkpoints
  src = str(tmp_path / "src")
  shutil.copytree(hf_dir, src)
  sd = load_file(os.path.join(src, "model.safetensors"))
  os.remove(os.path.join(src, "model.safetensors"))
  if layout == "sharded_safetensors":
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in parts.items():
      save_file({k: sd[k] for k in ks}, os.path.join(src, name))
    weight_map = {k: name for name, ks in parts.items() for k in ks}
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(src, "model.safetensors.index.json"), "w"))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, os.path.join(src, "pytorch_model.bin"))
  out = str(tmp_path / "out")
  assert cli.main(["convert", "--src", src, "--out", out]) == 0
  import jax
  got, want = checkpoints.load_params(out), checkpoints.load_params(ckpt)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(got) == jax.tree.structure(want)


def test_the_compilation_cache_keeps_every_program_and_counts_its_reads(tmp_path):
  """`--compilation-cache`: a program that compiles in milliseconds is stored too (jax's default keeps only those
  over a second), and a compile the cache answers counts as one hit."""
  import jax.numpy as jnp
  from jax._src import compilation_cache
  from evf_jax import runtime
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  x = np.arange(7, dtype=np.float32)
  try:
    runtime.enable_compilation_cache(str(tmp_path / "cache"))
    compilation_cache.reset_cache()  # this session's cache (conftest) was set up already
    f = jax.jit(lambda v: jnp.sin(v) * 3.25 + 0.5)
    np.asarray(f(x))
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith("jit__lambda")], os.listdir(tmp_path / "cache")
    hits = runtime.compilation_cache_hits()
    jax.clear_caches()
    np.asarray(f(x))
    assert runtime.compilation_cache_hits() == hits + 1
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a choice of XLA:CPU")
def test_eigen_dots_take_products_off_ynnpack():
  import jax.numpy as jnp
  from evf_jax import runtime
  x = np.ones((64, 64), np.float32)
  if "__ynn_fusion" not in jax.jit(jnp.matmul).lower(x, x).compile().as_text():
    pytest.skip("this jax does not compile products to YNNPACK")
  assert "__ynn_fusion" not in runtime.jit_eigen_dots(jnp.matmul).lower(x, x).compile().as_text()


def test_cudnn_attention_needs_a_gpu_on_every_other_platform(monkeypatch):
  from evf_jax import runtime
  monkeypatch.setattr(runtime, "backend", lambda: "tpu")
  with pytest.raises(UserError, match="attention cudnn needs an NVIDIA GPU; jax is running on tpu"):
    runtime.check_attention_platform("cudnn")
  runtime.check_attention_platform("xla")
  monkeypatch.setattr(runtime, "backend", lambda: "gpu")
  runtime.check_attention_platform("cudnn")
