"""The training benchmarks (benchmarks/train_cpu.py, benchmarks/train_gpu.py) at tiny size on CPU.

Timings here mean nothing: only that every section runs and writes its numbers, so a GPU session (minutes of
device time) or a long CPU run does not end without them. Also checked: both sides of the CPU comparison train
the same model (same trained and weight-decayed parameter counts, the same losses step after step), and the
GPU script records an error instead of dying, and skips what its time limit leaves no room for.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types

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


def _set_clocks(monkeypatch, perf_counter=time.perf_counter, wall=time.time):
  """train_gpu's `time` with these clocks in place of the real ones (step timings; the --time-limit budget)."""
  monkeypatch.setattr(train_gpu, "time", types.SimpleNamespace(perf_counter=perf_counter, time=wall,
                                                                strftime=time.strftime))


def _without_a_mesh(monkeypatch):
  monkeypatch.setattr("evf_jax.sharding.activate", lambda mesh, rules: contextlib.nullcontext())


def _small_step(n):
  """(state, the compiled step) of a small program shaped like the training step: (state, batch) -> (state, metrics)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n, n))
  return x, jax.jit(lambda s, b: (jnp.tanh(s @ b), {"loss": jnp.sum(s)})).lower(x, x).compile()


class _Clock:
  """time.perf_counter and time.time of train_gpu: each step the fake device runs advances it by its duration."""

  def __init__(self, durations):
    self.now, self.durations, self.calls = 0.0, list(durations), 0

  def step(self, state, batch):
    self.now += self.durations.pop(0)
    self.calls += 1
    return state, {"loss": float(self.calls)}


def _fake_steps(monkeypatch, durations, **kw):
  clock = _Clock(durations)
  _set_clocks(monkeypatch, perf_counter=lambda: clock.now, wall=lambda: clock.now)
  monkeypatch.setattr(train_gpu, "T_START", 0.0)
  _without_a_mesh(monkeypatch)
  ctx = train_gpu.Ctx()
  ctx.__dict__.update(compiled=clock.step, state={}, batch={}, mesh=None, rules=None, dev=None, images=8, n_devices=2,
                      flops=1e12, peak=4e12)
  args = types.SimpleNamespace(warmup=2, steps=3, prompts=3, time_limit=0, margin=20.0)
  args.__dict__.update(kw)
  return clock, ctx, args


def test_train_gpu_step_times_and_rates(monkeypatch):
  """2 warm-up steps, 3 timed ones (median 0.4 s, mean 0.5 s) and 3 pipelined ones (0.75 s in all): the rates
  count the better of the two, and the MFU is over both devices' peak."""
  clock, ctx, args = _fake_steps(monkeypatch, [0.5, 0.5, 0.2, 0.9, 0.4, 0.25, 0.25, 0.25])
  r = train_gpu.run_steps(ctx, "tiny", args)
  assert clock.calls == 8
  assert r["warmup_s"] == pytest.approx(1.0)
  assert r["step_all"] == pytest.approx([0.2, 0.9, 0.4]) and r["steps_timed"] == 3
  assert r["step_s"] == pytest.approx(0.4) and r["pipelined_step_s"] == pytest.approx(0.25)
  assert r["images_per_s"] == pytest.approx(8 / 0.25) and r["prompts_per_s"] == pytest.approx(24 / 0.25)
  assert r["model_tflops_per_s"] == pytest.approx(4.0)
  assert r["mfu"] == pytest.approx(0.5)  # 4 TFLOP/s of 2 x 4 TFLOP/s
  assert r["loss_first"] == 1.0 and r["loss_last"] == 8.0 and r["losses_finite"]


def test_train_gpu_timed_steps_stop_near_the_time_limit(monkeypatch):
  """100 s of --time-limit, 20 s of margin, 30 s steps: after the first timed step 70 s are left, less than the
  margin and two steps; the median of the one step is kept, and there is no time for pipelined steps."""
  clock, ctx, args = _fake_steps(monkeypatch, [30.0] * 5, warmup=0, steps=5, time_limit=100)
  r = train_gpu.run_steps(ctx, "tiny", args)
  assert clock.calls == 1 and r["steps_timed"] == 1 and r["step_s"] == pytest.approx(30.0)
  assert r["pipelined_step_s"] is None


def test_train_gpu_remat_none_and_the_profile_s_xla_flags(gpu_bench, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  profile = types.SimpleNamespace(profile=2)
  assert train_gpu.sizes_xla_flags(profile) == "--xla_foo=1 --xla_gpu_enable_command_buffer="
  assert train_gpu.sizes_xla_flags(types.SimpleNamespace(profile=0)) == "--xla_foo=1"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")  # the user's choice stays
  assert train_gpu.sizes_xla_flags(profile) == "--xla_gpu_enable_command_buffer=FUSION"
  r = gpu_bench(["--size", "tiny", "--remat", "none", "--time-limit", "1"])  # "none" is no size, not an error
  assert "left of --time-limit" in r["tiny"]["skipped"]


def test_train_gpu_parent_hands_each_size_to_a_child(gpu_bench, monkeypatch, tmp_path):
  """The child gets every option but --size/--role/--time-limit/--in-process (in both spellings), the time left
  of the limit (the clock here moves 10 s per reading), and the profile's XLA flags, which this process keeps out
  of its own environment."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  now = iter(range(1000, 2000, 10))
  _set_clocks(monkeypatch, wall=lambda: next(now))
  runs = []
  monkeypatch.setattr(train_gpu.subprocess, "run", lambda cmd, **kw: runs.append((cmd, kw["env"]))
                      or types.SimpleNamespace(returncode=0, stderr=""))
  out = str(tmp_path / "r.json")
  gpu_bench(["--size=tiny", "--steps", "3", "--time-limit", "500", "--profile=2", "--out", out])
  (cmd, env), = runs
  i = cmd.index("--role")
  assert cmd[i:i + 4] == ["--role", "child", "--size", "tiny"] and cmd[i + 4] == "--time-limit"
  assert 400 < float(cmd[i + 5]) < 500
  assert cmd[i + 6:] == ["--steps", "3", "--profile=2", "--out", out]
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer=" and "XLA_FLAGS" not in os.environ


def test_train_gpu_child_keeps_the_parent_s_keys(monkeypatch, tmp_path):
  out = tmp_path / "r.json"
  out.write_text(json.dumps({"date": "2026-12-02", "sizes": ["tiny"], "tiny": {}}))
  monkeypatch.setattr(train_gpu, "OUT_PATH", str(out))
  monkeypatch.setattr(train_gpu, "RESULTS", {"tiny": {"steps": {"step_s": 0.5}}})
  train_gpu.write_out("tiny")
  assert json.load(open(out)) == {"date": "2026-12-02", "sizes": ["tiny"], "tiny": {"steps": {"step_s": 0.5}}}


def test_train_gpu_profile_is_per_step(monkeypatch, tmp_path):
  """Three traced steps of a small program, each 0.1 s by train_gpu's clock: the device time and the wall time are
  reported per step, the device time a third of the trace's."""
  from evf_testing import profiling
  clock = types.SimpleNamespace(now=0.0)
  _set_clocks(monkeypatch, perf_counter=lambda: clock.now)
  _without_a_mesh(monkeypatch)
  monkeypatch.setattr(train_gpu, "OUT_PATH", str(tmp_path / "r.json"))
  x, compiled = _small_step(256)

  def step(state, batch):
    clock.now += 0.1
    return compiled(state, batch)

  ctx = train_gpu.Ctx()
  ctx.__dict__.update(state=x, batch=x, mesh=None, rules=None)
  ctx.compiled = type("Compiled", (), {"__call__": staticmethod(step), "as_text": staticmethod(compiled.as_text)})()
  r = train_gpu.profile_steps(ctx, "tiny", types.SimpleNamespace(profile=3, keep_trace_mib=100))
  text = compiled.as_text()
  traced = profiling.op_times(profiling.load_trace(str(tmp_path / r["trace"])), profiling.module_name(text))
  assert r["steps"] == 3 and r["traced_wall_ms_per_step"] == pytest.approx(100.0)
  assert r["device_ms"] > 0 and r["device_ms"] == pytest.approx(sum(traced.values()) / 1e3 / 3)


def test_train_gpu_profiles_a_size_when_time_is_left(monkeypatch):
  sections = []
  monkeypatch.setattr(train_gpu, "run_section", lambda label, name, fn, *a: sections.append(name) or {})
  monkeypatch.setattr(train_gpu, "T_START", time.time())
  train_gpu.run_size("tiny", types.SimpleNamespace(profile=2, time_limit=0, margin=20.0))
  assert sections == ["setup", "compile", "steps", "profile"]
  sections.clear()
  train_gpu.run_size("tiny", types.SimpleNamespace(profile=2, time_limit=25, margin=20.0))  # < 30 s left
  assert sections == ["setup", "compile", "steps"]


def test_train_gpu_traced_wall_is_the_steps_not_the_profiler_s_stop(monkeypatch, tmp_path):
  """The profiler's stop collects and writes the trace (seconds for a GPU step's thousands of kernels): the traced
  wall time per step, set beside the device time, leaves it out (here a stop made 0.6 s slower)."""
  import jax
  real = jax.profiler.trace

  @contextlib.contextmanager
  def slow_stop(path):
    with real(path):
      yield
    time.sleep(0.6)

  monkeypatch.setattr(jax.profiler, "trace", slow_stop)
  _without_a_mesh(monkeypatch)
  monkeypatch.setattr(train_gpu, "OUT_PATH", None)
  x, compiled = _small_step(64)
  ctx = train_gpu.Ctx()
  ctx.__dict__.update(compiled=compiled, state=x, batch=x, mesh=None, rules=None)
  r = train_gpu.profile_steps(ctx, "tiny", types.SimpleNamespace(profile=3, keep_trace_mib=0))
  assert 0 < r["traced_wall_ms_per_step"] < 100  # with the stop: over 200 ms per step


def test_train_gpu_memory_stats():
  dev = types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 5 << 30, "bytes_in_use": 3, "num_allocs": 7})
  assert train_gpu.memory_stats(dev) == {"peak_bytes_in_use": 5 << 30, "bytes_in_use": 3}
  assert train_gpu.memory_stats(types.SimpleNamespace(memory_stats=lambda: None)) is None  # the CPU's answer
