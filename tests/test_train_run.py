"""`run.py train` as a user runs it, on the micro synthetic config (evf_testing.training): it trains, evaluates,
exports a model that `Predictor` loads, resumes exactly (after a clean stop, SIGKILL mid-run, SIGKILL mid-save,
SIGTERM), refuses a workdir of another config, and reports bad input in one line before compiling anything."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import jax
from evf_jax import cli
from evf_jax.checkpoints import load_checkpoint
from evf_jax.images import decode_image
from evf_jax.predictor import Predictor
from evf_testing.training import assert_same_tree, saved_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = '''from evf_testing.training import micro_train_config


def get_config(arg=None):
  c = micro_train_config()
  c.optimizer.schedule = "constant"  # the learning rate at a step does not depend on total_steps
  return c
'''


@pytest.fixture(scope="module", autouse=True)
def _compile_fast(fast_compile):
  yield


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "micro.py"
  path.write_text(CONFIG)
  return str(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, config_file):
  """The synthetic data and tokenizer, made once and shared (each run reads them from --config.data.root)."""
  root = tmp_path_factory.mktemp("data")
  from data_pipelines import prepare
  prepare.build("synthetic", str(root), num_train=24, num_eval=3, seed=0, progress=False)  # TFDS: root/synthetic
  return str(root)


def _args(config_file, data_root, workdir, *extra):
  return ["train", "--config", config_file, "--workdir", str(workdir), f"--config.data.root={data_root}", *extra]


def _losses(workdir):
  """{step: loss} of metrics.jsonl, each step logged once (a resumed run drops the rows it trains again)."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == sorted(set(steps)), steps
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _initialisation(workdir):
  with open(os.path.join(workdir, "export", "provenance.json")) as f:
    return json.load(f)["initialisation"]


@pytest.fixture(scope="module")
def straight(config_file, data_root, tmp_path_factory):
  """An uninterrupted 6-step run in this process, steps 2 and 3 traced: the reference for every resumed run. Its
  workdir starts with the config.json of a run that failed before its first checkpoint (a bad setting), which
  this run replaces instead of asking for that setting again."""
  workdir = tmp_path_factory.mktemp("straight")
  (workdir / "config.json").write_text(json.dumps({"total_steps": 6, "data": {"max_text_len": 1000}}))
  assert cli.main(_args(config_file, data_root, workdir, "--profile_steps=2")) == 0
  return str(workdir)


def test_train_evaluates_and_exports_a_model_predictor_loads(straight, data_root, capsys):
  w = straight
  assert sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == [3, 6]
  saved = json.load(open(os.path.join(w, "config.json")))  # the failed run's config.json, replaced
  assert saved["data"]["max_text_len"] != 1000 and saved["optimizer"]["schedule"] == "constant"
  losses = _losses(w)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in losses.values())
  evals = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl")) if "eval/synthetic|val/giou" in line]
  assert len(evals) == 1 and 0.0 <= evals[0]["eval/synthetic|val/giou"] <= 1.0
  assert glob.glob(os.path.join(w, "tensorboard", "events.out.tfevents.*"))
  _check_trace(w, steps={2, 3})
  config, params, tokenizer = load_checkpoint(os.path.join(w, "export"))
  trained = saved_params(w, 6)
  for key in ("beit3", "projector"):  # the export holds the trained parameters
    assert_same_tree(params[key], trained[key])
  provenance = json.load(open(os.path.join(w, "export", "provenance.json")))
  assert provenance["step"] == 6 and provenance["initialisation"]["init"] == "random"
  from data_pipelines import sources
  image = decode_image(sources.read_records(os.path.join(data_root, "synthetic"), "val")[0].image)
  exported = Predictor.from_checkpoint(os.path.join(w, "export"))
  exported.set_image(image)
  in_memory = Predictor(config, jax.tree.map(np.asarray, params), tokenizer)
  in_memory.set_image(image)
  a, b = exported.predict(["the red circle", "[semantic] squares"]), in_memory.predict(["the red circle",
                                                                                       "[semantic] squares"])
  np.testing.assert_array_equal(a.logits, b.logits)
  assert cli.main(["predict", "--checkpoint", os.path.join(w, "export"), "--image", _png(image, w), "--prompt",
                   "the circle", "--out-dir", os.path.join(w, "pred")]) == 0
  assert os.path.isfile(os.path.join(w, "pred", "img_0_mask.png"))
  # `run.py eval` of the export (a model with 30 text positions, fewer than the 1022 it cuts prompts at by
  # default) gives the run's own evaluation at its last step.
  assert cli.main(["eval", "--checkpoint", os.path.join(w, "export"), "--data", data_root, "--split", "synthetic|val",
                   "--out-dir", os.path.join(w, "eval"), "--no-progress"]) == 0
  result = json.load(open(os.path.join(w, "eval", "synthetic_val.json")))
  assert result["giou"] == pytest.approx(evals[0]["eval/synthetic|val/giou"], abs=1e-9)
  assert result["ciou"] == pytest.approx(evals[0]["eval/synthetic|val/ciou"], abs=1e-9)


CUSTOM_CONFIG = f'''from evf_jax.train import config as train_config
from evf_testing.training import micro_train_config


def get_config(arg=None):
  custom = train_config.load_file("{ROOT}/configs/train/custom.py:name=mine")
  c = micro_train_config(steps=2)  # its model: the `straight` run's export is the starting point
  c.data.mixture, c.evals, c.export_best = custom.data.mixture.to_dict(), custom.evals, custom.export_best
  c.init.from_scratch, c.train_tokenizer_vocab, c.eval_every = False, 0, 2
  c.optimizer.lr = 1e-5  # micro's 1e-3 takes the start's gIoU of 0.22 on these images to 0 in one step
  return c
'''


def _write_custom_data(data_root, src):
  """A dataset of one's own in the layout of `run.py prepare --dataset custom`, from synthetic images and masks."""
  from PIL import Image
  from data_pipelines import sources
  os.makedirs(src)
  for split, take in (("train", slice(0, 6)), ("val", slice(6, 8))):
    lines = []
    for i, rec in enumerate(sources.read_records(os.path.join(data_root, "synthetic"), "train")[take]):
      with open(os.path.join(src, f"{split}{i}.png"), "wb") as f:
        f.write(rec.image)
      objects = []
      for k in range(len(rec.masks)):
        Image.fromarray(rec.mask(k) * 255).save(os.path.join(src, f"{split}{i}_{k}.png"))
        objects.append({"texts": [e.text for e in rec.entries if e.mask_index == k], "mask": f"{split}{i}_{k}.png"})
      lines.append(json.dumps({"image": f"{split}{i}.png", "objects": [o for o in objects if o["texts"]]}))
    with open(os.path.join(src, f"{split}.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")


def test_fine_tunes_a_checkpoint_on_a_custom_dataset_evaluated_by_name(straight, data_root, tmp_path, capsys):
  """configs/train/custom.py's data and evaluation on a dataset of one's own, from a trained export: the run
  evaluates `mine|val` as `run.py eval` does, and its export is a fine-tuned model. It trains in bf16 with
  eval.precision=fp32: its evaluation is `run.py eval --precision fp32` exactly and differs from the bf16 one (so
  the setting is what made them equal)."""
  data = str(tmp_path / "data")
  _write_custom_data(data_root, str(tmp_path / "src"))
  assert cli.main(["prepare", "--dataset", "custom", "--name", "mine", "--src", str(tmp_path / "src"), "--data_dir",
                   data, "--no-progress"]) == 0
  (tmp_path / "custom.py").write_text(CUSTOM_CONFIG)
  w, start = tmp_path / "w", os.path.join(straight, "export")
  assert cli.main(["train", "--config", str(tmp_path / "custom.py"), "--workdir", str(w), f"--config.data.root={data}",
                   f"--config.init.evf_checkpoint={start}", "--config.precision=bf16",
                   "--config.eval.precision=fp32"]) == 0
  logged = [json.loads(line) for line in open(w / "metrics.jsonl") if "eval/mine|val/giou" in line]
  results = {}
  for precision in ("fp32", "bf16"):
    assert cli.main(["eval", "--checkpoint", str(w / "export"), "--data", data, "--split", "mine|val",
                     "--out-dir", str(w / precision), "--precision", precision, "--no-progress"]) == 0
    results[precision] = json.load(open(w / precision / "mine_val.json"))
  assert len(logged) == 1 and logged[0]["eval/mine|val/giou"] == pytest.approx(results["fp32"]["giou"], abs=1e-9)
  assert results["bf16"]["giou"] != results["fp32"]["giou"]
  assert _initialisation(w)["init"] == "evf_checkpoint"
  before, after = load_checkpoint(start), load_checkpoint(str(w / "export"))
  assert after[0] == before[0]
  trained = saved_params(w, 2)
  for key in ("beit3", "projector"):  # the export holds the fine-tuned parameters, which moved from the start
    assert_same_tree(after[1][key], trained[key])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before[1][key], after[1][key]))
    assert sum(moved) > len(moved) // 2, (key, sum(moved), len(moved))


@pytest.fixture(scope="module")
def sam2_run(data_root, tmp_path_factory):
  """A 4-step EVF-SAM2 run (toy SAM-2, the micro config's BEiT-3 and data)."""
  config_file = tmp_path_factory.mktemp("cfg2") / "micro_sam2.py"
  config_file.write_text(CONFIG.replace("micro_train_config()", "micro_train_config(steps=4, sam2=True)"))
  workdir = tmp_path_factory.mktemp("sam2")
  assert cli.main(_args(str(config_file), data_root, workdir)) == 0
  return str(workdir)


@pytest.mark.slow
def test_evf_sam2_trains_evaluates_and_exports_a_model_predictor_loads(sam2_run, data_root, capsys):
  w = sam2_run
  losses = _losses(w)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())
  evals = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl")) if "eval/synthetic|val/giou" in line]
  assert len(evals) == 1 and 0.0 <= evals[0]["eval/synthetic|val/giou"] <= 1.0
  config, params, tokenizer = load_checkpoint(os.path.join(w, "export"))
  assert type(config).__name__ == "EvfSam2Config" and config.sam2.name == "toy"
  trained = saved_params(w, 4)
  assert sorted(trained) == ["beit3", "projector"]  # the original's frozen set: all of SAM-2
  for key in ("beit3", "projector"):
    assert_same_tree(params[key], trained[key])
  from data_pipelines import sources
  image = decode_image(sources.read_records(os.path.join(data_root, "synthetic"), "val")[0].image)
  exported = Predictor.from_checkpoint(os.path.join(w, "export"))
  exported.set_image(image)
  in_memory = Predictor(config, jax.tree.map(np.asarray, params), tokenizer)
  in_memory.set_image(image)
  np.testing.assert_array_equal(exported.predict(["the red circle"]).logits, in_memory.predict(["the red circle"]).logits)
  # `run.py export` merges the frozen SAM-2 back in: the run's own export, bit for bit.
  assert cli.main(["export", "--workdir", w, "--out", os.path.join(w, "again")]) == 0
  again = load_checkpoint(os.path.join(w, "again"))
  assert again[0] == config
  assert_same_tree(again[1], params)


def test_an_init_checkpoint_of_the_other_family_is_refused(config_file, data_root, tmp_path, capsys):
  """An EVF-SAM2 checkpoint (its model_config.json is all that is read before refusing) for an EVF-SAM config."""
  other = tmp_path / "evf_sam2_export"
  other.mkdir()
  from evf_jax.evf_sam2 import EvfSam2Config
  (other / "model_config.json").write_text(json.dumps(EvfSam2Config.preset("toy").to_dict()))
  from evf_testing import spm_model
  spm_model.train(str(other / "tokenizer"))  # read before the parameters
  code = cli.main(_args(config_file, data_root, tmp_path / "w", "--config.init.from_scratch=False",
                        f"--config.init.evf_checkpoint={other}", "--config.model.beit3.vocab_size=320"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "holds EVF-SAM2; config.model is EVF-SAM" in err[0], err


def _check_trace(workdir, steps):
  """One jax.profiler trace in <workdir>/profile holding exactly `steps` and the train step's device work."""
  from evf_testing import profiling
  runs = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*"))
  assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.xplane.pb")), runs
  events = profiling.load_trace(profiling.trace_file(runs[0]))
  assert {int(e["args"]["step_num"]) for e in events if e.get("name") == "train"} == steps
  assert any((e.get("args") or {}).get("hlo_module") == "jit_step" for e in events)  # the compiled step ran


def _png(image, directory):
  from PIL import Image
  path = os.path.join(directory, "img.png")
  Image.fromarray(image).save(path)
  return path


@pytest.mark.slow
def test_stop_and_resume_equals_the_uninterrupted_run(straight, config_file, data_root, tmp_path, capsys):
  """3 steps, then the same command with total_steps 6: parameters and per-step losses (hence the batches)
  bit-identical to the straight run."""
  w = tmp_path / "resumed"
  assert cli.main(_args(config_file, data_root, w, "--config.total_steps=3")) == 0
  assert cli.main(_args(config_file, data_root, w)) == 0
  out = capsys.readouterr()
  assert "resuming from" in out.out and "total_steps" in out.out
  assert_same_tree(saved_params(str(w), 6), saved_params(straight, 6))
  assert _losses(str(w)) == _losses(straight)
  assert _initialisation(str(w)) == _initialisation(straight) == {"init": "random", "seed": 0}


@pytest.mark.slow
def test_export_best_exports_the_step_with_the_best_giou(config_file, data_root, tmp_path, capsys):
  """export_best=True: export/ holds the model of the evaluated step with the highest gIoU (step 3 here, its
  recorded gIoU raised by hand), read back from its checkpoint, not the last step's; without it, the last."""
  w = tmp_path / "best"
  assert cli.main(_args(config_file, data_root, w, "--config.eval_every=3")) == 0
  with open(w / "checkpoints" / "3" / "metrics" / "metrics", "w") as f:
    json.dump({"giou": 1.0, "ciou": 1.0}, f)  # orbax's record of step 3's evaluation
  capsys.readouterr()
  assert cli.main(_args(config_file, data_root, w, "--config.eval_every=3", "--config.export_best=True")) == 0
  assert "exported the trained model of step 3 (the best by gIoU)" in capsys.readouterr().out
  assert json.load(open(w / "export" / "provenance.json"))["step"] == 3
  _, params, _ = load_checkpoint(str(w / "export"))
  best, last = saved_params(str(w), 3), saved_params(str(w), 6)
  for key in ("beit3", "projector"):
    assert_same_tree(params[key], best[key])
  assert not np.array_equal(params["projector"]["fc1"]["kernel"], last["projector"]["fc1"]["kernel"])
  assert cli.main(_args(config_file, data_root, w, "--config.eval_every=3")) == 0
  assert json.load(open(w / "export" / "provenance.json"))["step"] == 6


def test_a_workdir_of_another_config_refuses_to_resume(straight, config_file, data_root, tmp_path, capsys):
  """A copy of the straight run's workdir, resumed with another clip_norm: one line naming the difference, and
  nothing in the workdir changed but its lock file."""
  w = tmp_path / "other"
  shutil.copytree(straight, w)
  before = _tree_state(w)
  code = cli.main(_args(config_file, data_root, w, "--config.optimizer.clip_norm=0.5"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "optimizer.clip_norm=1.0, this run has 0.5" in err[0], err
  assert _tree_state(w) == before


def _tree_state(directory):
  """{relative path: (size, mtime)} of every file under `directory` but run.lock (each run writes its pid)."""
  return {os.path.relpath(os.path.join(d, f), directory): (os.path.getsize(os.path.join(d, f)),
                                                            os.path.getmtime(os.path.join(d, f)))
          for d, _, files in os.walk(directory) for f in files if f != "run.lock"}


def _straight_at_step_3(straight, workdir):
  """A copy of the straight run's workdir as it was before step 4: its step-6 checkpoint and export removed."""
  shutil.copytree(straight, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  shutil.rmtree(workdir / "export")
  return workdir


def test_sigterm_mid_run_saves_that_step_and_the_resumed_run_equals_the_uninterrupted_one(
    straight, config_file, data_root, tmp_path, monkeypatch, capsys):
  """The straight run's workdir back at its step-3 checkpoint, resumed; SIGTERM arrives as step 5's batch is
  placed: the run saves step 5 (off the checkpoint_every=3 grid) and exits 0. The same command then runs on to
  step 6: parameters and per-step losses bit-identical to the straight run, so each resume read on from the saved
  parameters, step and data position. (The slow tier sends the signals from outside, to a child process.)"""
  w = _straight_at_step_3(straight, tmp_path / "term")
  placed = []

  def terminated_at_step_5(host_batch, batch_sharding):
    placed.append(1)
    if len(placed) == 2:  # steps 4 and 5 of this run
      os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
    return global_batch(host_batch, batch_sharding)

  from evf_jax import sharding
  global_batch = sharding.global_batch
  monkeypatch.setattr(sharding, "global_batch", terminated_at_step_5)
  assert cli.main(_args(config_file, data_root, w)) == 0
  out = capsys.readouterr().out
  assert f"resuming from {w}/checkpoints/3" in out and "stopped by SIGTERM: saved step 5" in out, out[-2000:]
  assert _steps(str(w)) == [3, 5] and not (w / "export").exists()
  monkeypatch.undo()
  assert cli.main(_args(config_file, data_root, w)) == 0
  assert f"resuming from {w}/checkpoints/5" in capsys.readouterr().out
  assert_same_tree(saved_params(str(w), 6), saved_params(straight, 6))
  assert _losses(str(w)) == _losses(straight)


def test_the_first_report_counts_neither_the_compile_nor_the_first_batch_s_wait(
    straight, config_file, data_root, tmp_path, monkeypatch):
  """A data pipeline slow to start (2 s to its first batch, fetched before the step compiles): the first
  report's window begins after the compile, so neither that wait nor the compile is in its step time or its
  data-wait fraction (the wait alone had made the fraction about 6)."""
  w = _straight_at_step_3(straight, tmp_path / "slow_start")
  from data_pipelines import pipeline
  train_iterator, fetched = pipeline.train_iterator, []

  def slow_to_start(*args, **kwargs):
    iterator = train_iterator(*args, **kwargs)
    next_batch = type(iterator).__next__

    def next_after_a_slow_start(self):
      if not fetched:
        time.sleep(2.0)
      fetched.append(1)
      return next_batch(self)
    monkeypatch.setattr(type(iterator), "__next__", next_after_a_slow_start)
    return iterator

  monkeypatch.setattr(pipeline, "train_iterator", slow_to_start)
  assert cli.main(_args(config_file, data_root, w, "--config.log_every=1")) == 0
  rows = [json.loads(line) for line in open(w / "metrics.jsonl")]
  report = [r for r in rows if r["step"] == 4 and "train/loss" in r][0]
  assert len(fetched) >= 3 and report["train/data_wait_fraction"] < 0.5 and report["train/step_s"] < 2.0, report


def test_a_workdir_in_use_by_another_run_is_refused(config_file, data_root, tmp_path, capsys):
  """Two runs on one workdir (a scheduler's retry while the first still runs) both trained and crashed in orbax
  with doubled metrics; the second is now refused in one line naming the first, before it writes anything."""
  from evf_jax.train import checkpointing
  w = tmp_path / "w"
  with checkpointing.workdir_lock(str(w)):  # the first run (flock: a second open file conflicts, also here)
    code = cli.main(_args(config_file, data_root, w))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--workdir {w} is in use by another run (pid {os.getpid()} on " in err[0]
    assert sorted(os.listdir(w)) == ["run.lock"]
  with checkpointing.workdir_lock(str(w)):  # released when the first run ends
    pass


def test_a_loss_that_is_not_finite_stops_the_run_without_saving_that_state(config_file, data_root, tmp_path, capsys):
  """An absurd learning rate: the loss of step 1 is finite and saved, the parameters it leaves give an infinite
  or NaN loss at step 2, and the run stops there in one line, with only step 1's checkpoint and no export."""
  w = tmp_path / "w"
  code = cli.main(_args(config_file, data_root, w, "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
                        "--config.checkpoint_every=1", "--config.total_steps=4"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "the loss is" in err[0] and "at step 2; stopped without saving that state" in err[0], err
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]
  assert not (w / "export").exists()
  assert all(np.isfinite(v) for v in _losses(w).values()) and 1 in _losses(w)


def test_sigterm_before_the_training_loop_exits_cleanly(config_file, data_root, tmp_path, monkeypatch, capsys):
  """SIGTERM while the run prepares (here: as its data is located) ends it with status 0 and a line saying so;
  Python's default ended it with 143, which a scheduler may count as a failure."""
  from evf_jax.cli import run_train
  locate = run_train._data_dirs

  def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
    return locate(*args, **kwargs)

  monkeypatch.setattr(run_train, "_data_dirs", terminated)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    cli.main(_args(config_file, data_root, tmp_path / "w"))
  assert stopped.value.code == 0
  assert "stopped by SIGTERM before training" in capsys.readouterr().out
  assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_a_damaged_checkpoint_or_a_lost_config_is_one_line(straight, config_file, data_root, tmp_path, capsys):
  """The newest checkpoint's arrays cut short: one line naming it and the step to fall back to (was orbax's
  traceback, 150 lines). config.json deleted: refused, since nothing could be checked (was a resume with any
  settings, and the file never written again)."""
  damaged = tmp_path / "damaged"
  shutil.copytree(straight, damaged)
  arrays = sorted(glob.glob(str(damaged / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d" / "*")),
                  key=os.path.getsize)
  os.truncate(arrays[-1], 1000)
  code = cli.main(_args(config_file, data_root, damaged))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and f"{damaged}/checkpoints/6: cannot restore it (" in err[0], err
  assert "delete that folder to resume from step 3" in err[0], err
  lost = tmp_path / "lost"
  shutil.copytree(straight, lost)
  os.remove(lost / "config.json")
  code = cli.main(_args(config_file, data_root, lost, "--config.seed=3"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "holds checkpoints (the latest: step 6) but not the config.json" in err[0]
  code = cli.main(_args(config_file, data_root, damaged, "--config.total_steps=5"))  # below where it is
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "total_steps 5 is below step 6, where" in err[0], err


# ---------------------------------------------------------------- run.py export: any kept step

def _export(workdir, out, *extra):
  return cli.main(["export", "--workdir", str(workdir), "--out", str(out), *extra])


def test_export_writes_any_kept_step_as_a_checkpoint(straight, tmp_path, capsys):
  """`run.py export`: step 3 (which export/ does not hold) as a checkpoint directory with step 3's parameters;
  'best' and 'latest' (step 6 here, the one evaluated) equal the run's own export bit for bit. The workdir is
  only read: a save in progress there (orbax's temporary folder) is left alone."""
  in_progress = os.path.join(straight, "checkpoints", "9.orbax-checkpoint-tmp-1234567")
  os.makedirs(in_progress)
  try:
    assert _export(straight, tmp_path / "s3", "--step", "3") == 0
    assert os.path.isdir(in_progress)
  finally:
    shutil.rmtree(in_progress)
  assert f"the model of step 3 of {straight}" in capsys.readouterr().out
  config, params, tokenizer = load_checkpoint(str(tmp_path / "s3"))
  step3 = saved_params(straight, 3)
  for key in ("beit3", "projector"):
    assert_same_tree(params[key], step3[key])
  last = saved_params(straight, 6)
  assert not np.array_equal(params["projector"]["fc1"]["kernel"], last["projector"]["fc1"]["kernel"])
  provenance = json.load(open(tmp_path / "s3" / "provenance.json"))
  run_export = json.load(open(os.path.join(straight, "export", "provenance.json")))
  assert provenance["step"] == 3 and provenance["workdir"] == straight
  assert provenance["initialisation"] == run_export["initialisation"]
  assert provenance["initialisation"]["init"] == "random"
  assert provenance["config"]["total_steps"] == run_export["config"]["total_steps"] == 6
  exported = load_checkpoint(os.path.join(straight, "export"))
  for step in ("best", "latest"):
    assert _export(straight, tmp_path / step, "--step", step) == 0
    assert f"the model of step 6 (the best by gIoU) of {straight}" in capsys.readouterr().out
    again = load_checkpoint(str(tmp_path / step))
    assert again[0] == exported[0] == config
    assert_same_tree(again[1], exported[1])
    text = ["the red circle", "[semantic] squares"]
    assert np.array_equal(again[2].encode_batch(text)[0], tokenizer.encode_batch(text)[0])


def test_export_overwrite_replaces_a_checkpoint_whole(straight, tmp_path, monkeypatch, capsys):
  """--overwrite replaces an earlier export with another step's model; an export that fails half-way leaves the
  earlier one as it was (the new one is written beside it and moved in when complete)."""
  out = tmp_path / "model"
  assert _export(straight, out, "--step", "3") == 0
  assert _export(straight, out, "--step", "6", "--overwrite") == 0
  assert json.load(open(out / "provenance.json"))["step"] == 6
  assert_same_tree(load_checkpoint(str(out))[1], load_checkpoint(os.path.join(straight, "export"))[1])
  before = {name: (out / name).read_bytes() for name in ("model_config.json", "provenance.json")}
  from evf_jax.train import checkpointing

  def fail_half_way(directory, *args):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
      f.write("{}")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpointing, "save_trained_model", fail_half_way)
  with pytest.raises(OSError, match="No space left"):
    _export(straight, out, "--step", "3", "--overwrite")
  assert {name: (out / name).read_bytes() for name in before} == before
  assert os.listdir(tmp_path) == ["model"]  # nothing left beside it
  capsys.readouterr()


def test_export_refuses_bad_input_in_one_line(straight, tmp_path, capsys):
  """A step the run did not keep (the kept ones listed), 'best' with nothing evaluated, --out where training
  would replace it or a directory that is not a checkpoint, a folder that is not a workdir."""
  unevaluated = tmp_path / "unevaluated"  # step 3 alone: no gIoU recorded
  os.makedirs(unevaluated / "checkpoints")
  shutil.copy(os.path.join(straight, "config.json"), unevaluated)
  shutil.copytree(os.path.join(straight, "checkpoints", "3"), unevaluated / "checkpoints" / "3")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  shutil.copytree(os.path.join(straight, "export"), tmp_path / "earlier")  # a checkpoint: replaced with --overwrite
  cases = [
      ((straight, tmp_path / "earlier", "--step", "3"), "exists and is not empty; pass --overwrite to replace it"),
      ((straight, tmp_path / "o", "--step", "4"), "keeps no complete checkpoint of that step; it keeps 3, 6 (best)"),
      ((straight, tmp_path / "o", "--step", "six"), "--step 'six': expected a step number, 'latest' or 'best'"),
      ((unevaluated, tmp_path / "o", "--step", "best"), "no kept step of"),
      ((straight, os.path.join(straight, "export", "step3"), "--step", "3"), "is in the run's export/"),
      ((straight, tmp_path / "mine"), "exists and is not an evf-jax checkpoint directory"),
      ((tmp_path / "mine", tmp_path / "o"), "not a training workdir (config.json is missing)"),
      ((tmp_path / "nowhere", tmp_path / "o"), "no such directory"),
  ]
  for args, expect in cases:
    code = _export(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], (args, err)
  assert not os.path.exists(tmp_path / "o") and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
  provenance = lambda d: json.load(open(os.path.join(d, "provenance.json")))  # noqa: E731
  assert provenance(tmp_path / "earlier") == provenance(os.path.join(straight, "export"))  # not step 3's
  assert sorted(os.listdir(os.path.join(straight, "export"))) == ["model_config.json", "params", "provenance.json",
                                                                  "tokenizer"]


# ---------------------------------------------------------------- interruptions, in a child process

# The child: `run.py train` with each batch slowed down (so a signal lands mid-run) and, when asked, every
# checkpoint's final rename delayed (so a SIGKILL lands mid-save, after the data is written, before commit).
CHILD = r'''
import asyncio, sys, time
from data_pipelines import pipeline
from orbax.checkpoint._src.path import atomicity

_iterator = pipeline.train_iterator
def _slow(batch):
  time.sleep(0.8)  # two reader threads: ~0.4 s a batch, so a signal lands between steps, not after the run
  return batch
def slow_iterator(dataset, **k):
  return _iterator(dataset.map(_slow), **k)  # still grain's iterator: its state is checkpointed as usual
pipeline.train_iterator = slow_iterator
if "--slow-commit" in sys.argv:
  sys.argv.remove("--slow-commit")
  _finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self):
    if not str(self._final_path).endswith("/3"):  # the first checkpoint commits; the next ones hang
      await asyncio.sleep(60)
    return await _finalize(self)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
from evf_jax.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _child(config_file, data_root, workdir, *extra):
  return subprocess.Popen([sys.executable, "-c", CHILD, *_args(config_file, data_root, workdir, *extra)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the child exited ({proc.returncode}) early:\n{proc.stdout.read()[-3000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _finish(config_file, data_root, workdir):
  """The same command, in this process, to the end."""
  assert cli.main(_args(config_file, data_root, workdir)) == 0


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_lose_only_unfinished_work(straight, config_file, data_root, tmp_path):
  """SIGKILL right after the first checkpoint committed (mid-run), and SIGKILL while the second checkpoint's data
  is on disk but not committed (mid-save): each time the next run resumes from the last complete checkpoint and
  ends bit-identical to the uninterrupted run."""
  for name, extra in (("mid_run", ()), ("mid_save", ("--slow-commit",))):
    w = str(tmp_path / name)
    proc = _child(config_file, data_root, w, *extra)
    if name == "mid_run":
      _wait_for(lambda: _steps(w) == [3], proc)
    else:
      _wait_for(lambda: glob.glob(os.path.join(w, "checkpoints", "6.orbax-checkpoint-tmp*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _steps(w) == [3], (name, os.listdir(os.path.join(w, "checkpoints")))
    _finish(config_file, data_root, w)
    assert_same_tree(saved_params(w, 6), saved_params(straight, 6))
    assert _losses(w) == _losses(straight)  # the steps logged after step 3 before the kill are logged once
    assert not glob.glob(os.path.join(w, "checkpoints", "*tmp*"))  # the half-written save was cleaned up


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_logs_each_step_once(straight, config_file, data_root, tmp_path):
  """Killed before any checkpoint: the next run starts afresh and drops the killed run's metrics rows (they were
  kept, so early steps were logged twice, and TensorBoard drew two curves)."""
  w = str(tmp_path / "early")
  proc = _child(config_file, data_root, w, "--config.checkpoint_every=100")
  metrics = os.path.join(w, "metrics.jsonl")
  logged = lambda: os.path.isfile(metrics) and "\n" in (text := open(metrics).read()) and '"train/loss"' in \
      text.split("\n")[0]  # one whole row
  _wait_for(logged, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _steps(w) == [] and logged()
  _finish(config_file, data_root, w)
  assert _losses(w) == _losses(straight)
  assert_same_tree(saved_params(w, 6), saved_params(straight, 6))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(straight, config_file, data_root, tmp_path):
  w = str(tmp_path / "term")
  proc = _child(config_file, data_root, w, "--config.checkpoint_every=100")
  _wait_for(lambda: os.path.isfile(os.path.join(w, "metrics.jsonl")), proc)  # training steps are running
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  saved = _steps(w)
  assert len(saved) == 1 and 1 <= saved[0] < 6 and f"stopped by SIGTERM: saved step {saved[0]}" in out, out[-2000:]
  _finish(config_file, data_root, w)
  assert_same_tree(saved_params(w, 6), saved_params(straight, 6))


@pytest.mark.slow
def test_a_resumed_run_reads_its_step_from_the_compilation_cache(straight, config_file, data_root, tmp_path):
  """`--compilation_cache`: the first launch compiles the step and stores it, the resumed launch (a new process)
  reads it back, and the run still ends bit-identical to the uninterrupted one."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' own cache
  w, cache = str(tmp_path / "w"), str(tmp_path / "cache")
  outputs = []
  for extra in (("--config.total_steps=3",), ()):
    proc = subprocess.run([sys.executable, "run.py", *_args(config_file, data_root, w, *extra),
                           f"--compilation_cache={cache}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    outputs.append([line for line in proc.stdout.splitlines() if line.startswith("compiled the train step")])
  assert len(outputs[0]) == 1 and "compilation cache" not in outputs[0][0], outputs
  assert len(outputs[1]) == 1 and "(read from the compilation cache)" in outputs[1][0], outputs
  assert_same_tree(saved_params(w, 6), saved_params(straight, 6))


@pytest.mark.slow
def test_a_profile_that_cannot_start_does_not_stop_training(config_file, data_root, tmp_path, capsys):
  """jax runs one trace at a time: under the caller's own trace, the run trains on without its profile."""
  jax.profiler.start_trace(str(tmp_path / "outer"))
  try:
    code = cli.main(_args(config_file, data_root, tmp_path / "w", "--config.total_steps=2", "--profile_steps=1"))
  finally:
    jax.profiler.stop_trace()
  out = capsys.readouterr().out
  assert code == 0 and "no profile: Profile has already been started" in out, out[-2000:]
  assert _steps(str(tmp_path / "w")) == [2] and not os.path.exists(tmp_path / "w" / "profile")


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_and_exports_like_a_local_one(straight, config_file, data_root, gcs_bucket,
                                                                   capsys):
  """`--workdir gs://...` on a local GCS emulator: 3 steps (step 2 traced), then the same command to 6: the
  checkpoints, metrics, TensorBoard events, trace and export all land in the bucket, and the parameters and
  per-step losses are bit-identical to the local uninterrupted run's; the export loads from the bucket."""
  from evf_jax import storage
  w = f"gs://{gcs_bucket}/train"
  assert cli.main(_args(config_file, data_root, w, "--config.total_steps=3", "--profile_steps=1")) == 0
  assert cli.main(_args(config_file, data_root, w)) == 0
  out = capsys.readouterr().out
  assert f"resuming from {w}/checkpoints/3" in out and f"model in {w}/export" in out
  files = storage._files_under(w)
  assert {"config.json", "metrics.jsonl", "tokenizer/sentencepiece.bpe.model", "export/model_config.json",
          "export/tokenizer/sentencepiece.bpe.model", "checkpoints/6/commit_success.txt"} <= set(files), files
  assert [f for f in files if f.startswith("tensorboard/events.out.tfevents.")]
  assert [f for f in files if f.startswith("profile/plugins/profile/") and f.endswith(".xplane.pb")]
  rows = [json.loads(line) for line in storage.path(f"{w}/metrics.jsonl").read_text().splitlines()]
  assert {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} == _losses(straight)
  assert_same_tree(saved_params(w, 6), saved_params(straight, 6))
  _, params, _ = load_checkpoint(f"{w}/export")
  _, local, _ = load_checkpoint(os.path.join(straight, "export"))
  assert_same_tree(params, local)
  from data_pipelines import sources
  image = decode_image(sources.read_records(os.path.join(data_root, "synthetic"), "val")[0].image)
  out_dir = os.path.join(straight, "pred_gcs")
  assert cli.main(["predict", "--checkpoint", f"{w}/export", "--image", _png(image, straight), "--prompt",
                   "the circle", "--out-dir", out_dir]) == 0
  assert os.path.isfile(os.path.join(out_dir, "img_0_mask.png"))


# ---------------------------------------------------------------- bad input: one line, before any compile


def test_help_lists_every_flag(capsys):
  from evf_jax.cli import run_train
  with pytest.raises(SystemExit) as exit_:
    cli.main(["train", "--help"])
  out = capsys.readouterr().out
  assert exit_.value.code == 0
  for name in run_train._flags(["run.py train"]):
    assert f"--{name}:" in out, name


@pytest.mark.parametrize("extra,expect", [
    (("--config.data.root=/nonexistent", "--config.data.synthetic.num_train=0"),
     "no prepared dataset at /nonexistent/synthetic"),
    (("--config.no_such_field=1",), "no_such_field"),
    (("--config.total_stepz=3",), "the config has no field 'total_stepz' (did you mean 'total_steps'?)"),
    (("--config", f"{ROOT}/configs/train/nope.py"), "--config: [Errno 2] No such file or directory"),
    (("--config", f"{ROOT}/configs/train/refcoco.py:size=giant"), "refcoco.py:size=giant: size=giant: expected huge"),
    (("--config", f"{ROOT}/configs/train/synthetic.py:sam2=ture"), "config argument sam2=ture: expected true or false"),
    (("--config", f"{ROOT}/configs/train/custom.py"), "custom.py: name=NAME is required"),
    (("--config.mesh=(('data', 3),)",), "mesh [('data', 3)] has 3 devices, but there are 8"),
    (("--config.batch_size=12",), "batch_size 12"),
    (("--config.mesh=(('data', 4), ('fdsp', 2))",), "mesh axis 'fdsp' (2 devices) is not one the sharding rules use"),
    (("--config.mesh=(('dta', -1),)",), "mesh axis 'dta' (8 devices) is not one the sharding rules use"),
    (("--config.loss.images_per_group=3",), "microbatches of 8 images, which loss.images_per_group 3 does not divide"),
    (("--config.loss.images_per_group=-1",), "config.loss.images_per_group must be >= 0, got -1"),
    (("--config.checkpoint_every=0",), "config.checkpoint_every must be >= 1, got 0"),
    (("--config.data.num_prompts=0",), "config.data.num_prompts must be >= 1, got 0"),  # trained on no loss
    (("--config.optimizer.lr=-1",), "config.optimizer.lr must be >= 0, got -1"),
    (("--config.optimizer.lr=nan",), "config.optimizer.lr must be >= 0, got nan"),
    (("--config.optimizer.b2=1.0",), "config.optimizer.b2 must be in [0, 1), got 1.0"),
    (("--config.optimizer.eps=0",), "config.optimizer.eps must be > 0, got 0"),  # Adam divides by sqrt(v) + eps
    (("--config.optimizer.clip_norm=-1",), "config.optimizer.clip_norm must be >= 0, got -1"),
    (("--config.data.mask_size=-32",), "config.data.mask_size must be >= 0, got -32"),
    (("--config.eval.batch_size=0",), "config.eval.batch_size must be >= 1, got 0"),
    (("--config.data.max_text_len=2",), "config.data.max_text_len must be >= 3, got 2"),  # no text: every prompt <s></s>
    (("--config.data.max_text_len=1000",), "config.data.max_text_len 1000: this model's BEiT-3 has text positions"),
    (("--config.model.sam.img_size=-128",), "config.model: img_size: must be >= 1, got -128"),
    (("--config.init.from_scratch=False", "--config.init.evf_checkpoint=/nonexistent"),
     "init.evf_checkpoint: no such directory: /nonexistent"),  # was "/nonexistent/tokenizer: no sentencepiece"
    (("--config.init.from_scratch=False", "--config.init.sam_checkpoint=/nope.pth"), "init.sam_checkpoint: no such file"),
    (("--config.trainable=('beit3/nothing',)",), "match no parameter"),
    # jax's gather reads ids past the table as NaN; the run's own prompt length is data.max_text_len, not 1022.
    (("--config.model.beit3.vocab_size=20",), "ids, more than this model's 20 (BEiT-3's vocab_size)"),
    (("--config.attention=cudnn",), "cuDNN attention needs precision bf16"),
    (("--config.precision=fp16",), "fp16 needs a GPU"),
    (("--config.eval.precision=fp64",), "config.eval.precision 'fp64': expected '' (the training's) or one of"),
    (("--config.eval.precision=fp16",), "fp16 needs a GPU"),
    (("--config.optimizer.name=lion",), "config.optimizer.name 'lion': expected one of adamw, muon"),
    (("--profile_steps=-2",), "profile: steps -2"),
    (("--workdir=s3://bucket/run",), "--workdir s3://bucket/run: only local paths and gs:// URLs are supported"),
    (("--workdir=gs://bucket/run", "--config.data.root="), "data.root is empty, so the data would live in "
                                                           "gs://bucket/run/data"),
    (("--config.data.root=gs://bucket/data",), "data.root gs://bucket/data: datasets are read from local paths"),
    (("--config.dcn_mesh=(('dta', -1),)",), "dcn_mesh: 'dta' is not an axis of the mesh"),
    ((f"--compilation_cache={ROOT}/README.md",), "README.md is not a directory"),
    ((f"--workdir={ROOT}/README.md/run",), "README.md/run: cannot write there (Not a directory)"),
])
def test_bad_input_is_one_line_before_compiling(config_file, data_root, tmp_path, capsys, extra, expect):
  args = _args(config_file, data_root, tmp_path / "w")
  args = [a for a in args if not (a.startswith("--config.data.root") and any(e.startswith("--config.data.root")
                                                                            for e in extra))]
  t0 = time.time()
  code = cli.main(args + list(extra))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
  assert time.time() - t0 < 30  # nothing was compiled


def test_a_wrong_init_checkpoint_is_refused(straight, config_file, data_root, tmp_path, capsys):
  """Fine-tuning from an EVF-SAM checkpoint of another model: one line naming the difference."""
  code = cli.main(_args(config_file, data_root, tmp_path / "w", "--config.init.from_scratch=False",
                        f"--config.init.evf_checkpoint={os.path.join(straight, 'export')}",
                        "--config.model.sam.embed_dim=64"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "is another model" in err[0] and "embed_dim" in err[0], err


def test_a_resumed_run_drops_the_rows_it_trains_again(tmp_path):
  """metrics.jsonl after a kill: rows past the restored step go, and so does a last line the kill cut short."""
  from evf_jax.train.trainer import _drop_rows_after
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 6)] + [{"step": 3, "eval/x/giou": 0.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "train/lo')
  _drop_rows_after(str(path), 3)
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3] + rows[5:]


def test_a_report_s_rates_and_mfu(tmp_path, monkeypatch):
  """4 steps of 8 images in 2 s, 0.5 s of it waiting for data, 1 TFLOP per step on 4 devices of 1 TFLOP/s each:
  2 steps/s, 16 images/s, 0.5 s per step, a quarter of the time waiting, 2 TFLOP/s of 4 (MFU 0.5); the
  metrics are the window's means."""
  from ml_collections import ConfigDict
  from evf_jax.train import trainer
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  window = [{"step": s, "loss": loss, "bce": 0.5, "dice": 0.25, "lr": 1e-4, "grad_norm": 2.0}
            for s, loss in zip(range(5, 9), (1.0, 2.0, 3.0, 6.0))]
  scalars = {}
  writer = SimpleNamespace(add_scalar=lambda k, v, step: scalars.setdefault(k, v), sync=lambda: None)
  bar = SimpleNamespace(n=8, update=lambda n: None, set_postfix=lambda post, refresh: None)
  me = SimpleNamespace(cfg=ConfigDict({"batch_size": 8}), workdir=str(tmp_path))
  trainer.Trainer._report(me, window, 8, 2.0, 0.5, 1e12, 1e12, bar, writer)
  row = json.loads((tmp_path / trainer.METRICS_FILE).read_text())
  assert row["step"] == 8
  expect = {"images_per_s": 16.0, "step_s": 0.5, "data_wait_fraction": 0.25, "mfu": 0.5, "loss": 3.0, "dice": 0.25}
  for key, value in expect.items():
    assert row[f"train/{key}"] == pytest.approx(value) == scalars[f"train/{key}"], key


def test_mfu_is_measured_against_the_config_s_peak_or_else_the_device_kind_s(monkeypatch):
  from ml_collections import ConfigDict
  from evf_jax.train import trainer
  assert trainer.peak_flops_per_device(ConfigDict({"peak_tflops": 2.5})) == 2.5e12
  assert trainer.peak_flops_per_device(ConfigDict({"peak_tflops": 0.0})) is None  # a CPU has no peak: no MFU
  monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")])
  assert trainer.peak_flops_per_device(ConfigDict({"peak_tflops": 0.0})) == 989e12
  assert trainer.peak_flops_per_device(ConfigDict({"peak_tflops": 400.0})) == 400e12
