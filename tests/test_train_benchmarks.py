"""The training benchmarks (benchmarks/train_cpu.py, benchmarks/train_gpu.py) at tiny size on CPU.

Timings here mean nothing: only that every section runs and writes its numbers, so a GPU session (minutes of
device time) or a long CPU run does not end without them. Also checked: both sides of the CPU comparison train
the same model (same trained and weight-decayed parameter counts, the same losses step after step), and the
GPU script records an error instead of dying, and skips what its time limit leaves no room for.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from benchmarks import train_cpu, train_gpu
from evf_jax import flops as model_flops
from evf_jax.evf import EvfConfig
from evf_testing import cudnn_stand_in


def _run(monkeypatch, main, argv):
  monkeypatch.setattr(sys, "argv", ["bench"] + argv)
  main()


def _no_errors(tree, where=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      assert not (k.endswith("_error") or k == "skipped"), f"{where}/{k}: {v}"
      _no_errors(v, f"{where}/{k}")


# ---------------------------------------------------------------- train_cpu


def _check_cpu_result(r, rounds=1, steps=2):
  for key in ("ours_step_s", "torch_step_s", "ratio", "ours_peak_rss_mib", "torch_peak_rss_mib"):
    assert r[key] > 0, key
  assert len(r["ours_compile_s"]) == rounds and r["ours_compile_s"][0] > 0
  for side in ("ours", "torch"):
    assert len(r["runs"][side]) == rounds
    for run in r["runs"][side]:
      assert len(run["step_all"]) == steps and all(t > 0 for t in run["step_all"])
  # The same model, batch and optimizer on both sides.
  assert r["counts_match"], r["counts"]
  assert r["counts"]["ours"]["decayed"] > 0
  ours, torch = r["losses"]["ours"], r["losses"]["torch"]
  assert len(ours) == len(torch) == steps + 1
  assert r["first_round_max_rel_loss_diff"] < 1e-4, (ours, torch)


@pytest.mark.slow
def test_train_cpu_quick(monkeypatch, tmp_path, capsys):
  out = tmp_path / "train_cpu.json"
  _run(monkeypatch, train_cpu.main, ["--quick", "--workdir", str(tmp_path), "--out", str(out)])
  r = json.load(open(out))
  _check_cpu_result(r)
  assert r["setup"]["size"] == "tiny" and r["parts"] is None
  assert "RESULT " in capsys.readouterr().out


@pytest.mark.slow
def test_train_cpu_parts_and_rounds(monkeypatch, tmp_path):
  """Two alternating rounds (the second compiles from the persistent cache) and the per-part timings."""
  out = tmp_path / "train_cpu.json"
  _run(monkeypatch, train_cpu.main, ["--quick", "--rounds", "2", "--parts", "--workdir", str(tmp_path), "--out", str(out)])
  r = json.load(open(out))
  _check_cpu_result(r, rounds=2)
  for side in ("ours", "torch"):
    for key in ("encoder_fwd", "beit3_fwd_bwd", "decoder_fwd_bwd", "upsample_loss_fwd_bwd", "clip_adamw"):
      assert r["parts"][side][key] > 0, (side, key)


# ---------------------------------------------------------------- train_gpu


@pytest.fixture
def gpu_bench(monkeypatch):
  monkeypatch.setattr(train_gpu, "RESULTS", {})
  monkeypatch.setattr(train_gpu, "OUT_PATH", None)

  def run(argv):
    train_gpu.main(argv)
    return dict(train_gpu.RESULTS)
  return run


def _check_gpu_size(r, images=2, prompts=3, text_len=64):
  _no_errors(r)
  setup, comp, steps = r["setup"], r["compile"], r["steps"]
  config = EvfConfig.preset(setup["preset"])
  assert setup["images"] == images and setup["prompts_per_image"] == prompts
  assert setup["model_flops_per_step"] == model_flops.train_step(config, images=images, prompts_per_image=prompts,
                                                                 text_len=text_len, encoder_frozen=True)
  assert comp["compile_s"] > 0 and comp["trace_lower_s"] > 0
  assert steps["steps_timed"] == len(steps["step_all"]) > 0
  for key in ("step_s", "images_per_s", "prompts_per_s", "model_tflops_per_s"):
    assert steps[key] > 0, key
  assert "mfu" in steps and "memory" in steps  # None on CPU (no peak FLOP/s, no memory stats)
  assert steps["losses_finite"]


@pytest.mark.slow
def test_train_gpu_tiny_on_cpu(gpu_bench, tmp_path):
  """As the GPU session runs it (each size in a child process writing into --out), at tiny size on CPU."""
  out = tmp_path / "train_gpu.json"
  gpu_bench(["--size", "tiny", "--devices", "1", "--steps", "2", "--warmup", "1", "--profile", "2", "--out", str(out)])
  r = json.load(open(out))
  assert r["backend"] == "cpu" and r["sizes"] == ["tiny"]
  _check_gpu_size(r["tiny"])
  assert r["tiny"]["setup"]["remat"] is False and r["tiny"]["setup"]["precision"] == "bf16"
  assert r["tiny"]["steps"]["pipelined_step_s"] > 0
  assert set(r["tiny"]["section_s"]) == set(train_gpu.SECTIONS)
  # The profile: device time per part and pass of the model, nearly all of it attributed.
  prof = r["tiny"]["profile"]
  assert "--xla_gpu_enable_command_buffer=" in r["xla_flags"] == prof["xla_flags"]
  assert "command_buffer" not in os.environ.get("XLA_FLAGS", "")  # the child's setting, not this process's
  got = {(row["part"], row["pass"]): row["ms"] for row in prof["parts"]}
  for part in ("BEiT-3", "projector", "SAM prompt encoder + mask decoder", "upsampling to the loss size", "loss"):
    assert got.get((part, "forward"), 0) > 0 and got.get((part, "backward"), 0) > 0, (part, got)
  assert got[("SAM image encoder", "forward")] > 0 and ("SAM image encoder", "backward") not in got  # frozen
  assert got[("optimizer update and norms", "outside")] > 0
  assert got.get(("unattributed", "outside"), 0) < 0.1 * prof["device_ms"], got
  assert prof["trace"] == "train_gpu_tiny.trace.json.gz" and (tmp_path / prof["trace"]).stat().st_size > 0


def test_train_gpu_refuses_unknown_sizes(gpu_bench, capsys):
  """A misspelt size in --remat ran that size without remat, unnoticed in the results; now refused like --size."""
  for argv, flag in ((["--size", "tiny", "--remat", "tinny"], "--remat"), (["--size", "tiny,huge"], "--size")):
    with pytest.raises(SystemExit) as exit_:
      gpu_bench(argv)
    assert exit_.value.code == 2 and f"{flag}: expected" in capsys.readouterr().err, argv


def test_train_gpu_records_errors_and_skips(gpu_bench, tmp_path):
  """cuDNN attention where there is no GPU: the setup's error is recorded and the run ends normally; a size
  the time limit leaves no room for is skipped, and says so."""
  out = tmp_path / "train_gpu.json"
  r = gpu_bench(["--size", "tiny", "--attention", "cudnn", "--in-process", "--out", str(out)])
  assert "needs an NVIDIA GPU" in r["tiny"]["setup_error"]
  assert "compile" not in r["tiny"] and json.load(open(out))["tiny"]["setup_error"]
  r = gpu_bench(["--size", "tiny,base", "--time-limit", "1", "--out", str(out)])
  assert "left of --time-limit" in r["tiny"]["skipped"] and "left of --time-limit" in r["base"]["skipped"]


@pytest.mark.slow
def test_train_gpu_cudnn_path_with_remat(gpu_bench, monkeypatch, tmp_path):
  """The cuDNN attention path of the training step (XLA standing in for cuDNN on CPU), with remat."""
  calls = cudnn_stand_in.install(monkeypatch)
  monkeypatch.setattr("evf_jax.runtime.check_attention_platform", lambda attention: None)
  out = tmp_path / "train_gpu.json"
  r = gpu_bench(["--size", "tiny", "--devices", "1", "--steps", "2", "--warmup", "1", "--attention", "cudnn",
                 "--remat", "tiny", "--prompts", "2", "--text-len", "16", "--in-process", "--out", str(out)])
  assert calls["cudnn"] > 0
  _check_gpu_size(r["tiny"], prompts=2, text_len=16)
  assert r["tiny"]["setup"]["remat"] is True and r["tiny"]["setup"]["attention"] == "cudnn"
