"""benchmarks/eval_compile.py: its collective count and errors here. Compiling for a TPU slice or for GPUs
needs libtpu (scripts/setup_static_env.sh tpu) or jax's CUDA plugin (scripts/setup_static_env.sh gpu), which
the test environment does not have on purpose: those tests are in the slow tier and skip where the
environment is missing."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import types

import pytest

from benchmarks import deviceless, eval_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_collectives_counted_once_per_operation():
  hlo = """
  %ag = f32[8,4]{1,0} all-gather(%x), dimensions={0}
  %ars = f32[4]{0} all-reduce-start(%y), to_apply=%add
  %ard = f32[4]{0} all-reduce-done(%ars)
  %cp = f32[4]{0} collective-permute(%z), source_target_pairs={{0,1}}
  %fusion.all-gather-like = f32[4]{0} fusion(%w), kind=kLoop, calls=%f
  """
  assert deviceless.collectives(hlo) == {"all-gather": 1, "all-reduce": 1, "collective-permute": 1}
  assert deviceless.collectives("%a = f32[4]{0} add(%x, %y)") == {}


def test_without_libtpu(capsys):
  assert eval_compile.main(["--size", "tiny"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "setup_static_env.sh tpu" in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--attention", "cudnn"], "--attention cudnn is for --platform gpu"),
    (["--platform", "gpu", "--attention", "cudnn", "--precision", "fp32"], "needs --precision bf16"),
])
def test_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    eval_compile.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_does_not_overwrite(tmp_path, capsys):
  mine = tmp_path / "summary.json"
  mine.write_text("keep")
  with pytest.raises(SystemExit) as e:
    eval_compile.main(["--json", str(mine)])
  assert e.value.code == 2 and mine.read_text() == "keep"


# What main() reads of the compiled step, with known numbers: XLA's compile stands aside (main() traces and lowers the
# step itself, on this machine's CPU devices).
MEMORY = {"argument": 2_500_000_000, "output": 40_000_000, "temp": 310_000_000, "generated_code": 1_000_000}
HLO = """  %ag = f32[8,4]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %ars = f32[4]{0} all-reduce-start(%y), channel_id=2, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(%ars)"""


@pytest.fixture
def stand_ins(monkeypatch):
  import jax
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  seen = {"lowered": [], "devices": []}

  def compile_(lowered, *args, **kwargs):
    seen["lowered"].append(lowered)
    return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
        **{f"{k}_size_in_bytes": v for k, v in MEMORY.items()}), as_text=lambda: HLO)

  def devices_(*args):
    seen["devices"].append(args)
    return jax.devices()[:4]

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
  monkeypatch.setattr(deviceless, "use_compile_only_tpu", lambda tool: None)
  monkeypatch.setattr(deviceless, "use_compile_only_cuda", lambda flags, tool: None)
  monkeypatch.setattr(deviceless, "tpu_devices", devices_)
  monkeypatch.setattr(deviceless, "cuda_devices", devices_)
  return seen


def test_summary_of_a_compile(stand_ins, tmp_path):
  """The default topology asked of libtpu; the batch of images per device times the devices, split over them;
  the kernels in the compute dtype (bf16); memory in GB (1e9) as XLA reports it; the program's collectives."""
  import jax
  out = tmp_path / "summary.json"
  argv = ["--size", "tiny", "--images-per-device", "2", "--mask-size", "128", "--json", str(out)]
  assert eval_compile.main(argv) == 0
  summary = json.loads(out.read_text())
  assert stand_ins["devices"] == [("v5e:2x2",)] and summary["devices"] == 4
  assert summary["settings"]["topology"] == "v5e:2x2" and "json" not in summary["settings"]
  assert summary["per_device_gb"] == pytest.approx({"argument": 2.5, "output": 0.04, "temp": 0.31,
                                                    "generated_code": 0.001})
  assert summary["collectives"] == {"all-gather": 1, "all-reduce": 1}
  lowered = stand_ins["lowered"][0]
  params, batch = lowered.args_info[0]
  assert {a.shape[0] for a in batch.values()} == {8}
  kernels = {a.dtype for path, a in jax.tree_util.tree_leaves_with_path(params)
             if "kernel" in jax.tree_util.keystr(path)}
  assert kernels == {jax.numpy.dtype("bfloat16")}
  # The SAM images' argument is split over the 4 devices (Shardy's or GSPMD's spelling), not replicated.
  image = re.search(r"tensor<8x\d+x\d+x3xui8>(.*?)(?:, %arg|\) ->)", lowered.as_text()).group(1)
  assert '"data"' in image or "devices=[4" in image, image


def test_gpu_defaults_and_an_unknown_topology(stand_ins, capsys):
  def unknown(*args):
    stand_ins["devices"].append(args)
    raise RuntimeError("no such topology\n  (the plugin's trace)")

  deviceless.cuda_devices = unknown  # undone with the fixture's monkeypatch
  assert eval_compile.main(["--platform", "gpu", "--size", "tiny"]) == 2
  assert stand_ins["devices"] == [("h100", "1x1x4")]
  assert capsys.readouterr().err.strip().splitlines() == ["error: gpu topology '1x1x4': no such topology"]


def _compile(python: pathlib.Path, tmp_path, *argv) -> dict:
  out = tmp_path / "summary.json"
  proc = subprocess.run([str(python), "-m", "benchmarks.eval_compile", *argv, "--json", str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text())


TPU_PYTHON = ROOT / ".venv-tpu-static" / "bin" / "python"
GPU_PYTHON = ROOT / ".venv-gpu-static" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not TPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh tpu (~1.5 GB)")
def test_evaluation_step_for_a_tpu_slice_communicates_nothing(tmp_path):
  """SAM-B + BEiT-3-base, bf16, over the 4 chips of a v5e 2x2 slice: it lowers for TPU, and the data-parallel
  step holds no cross-chip operation (the global blocks' chunked attention once gathered every image's
  q, k and v onto every chip)."""
  summary = _compile(TPU_PYTHON, tmp_path, "--size", "base", "--topology", "v5e:2x2")
  assert summary["devices"] == 4 and "TPU" in summary["device_kind"]
  assert summary["collectives"] == {}
  assert summary["per_device_gb"]["argument"] > 0.3  # SAM-B + BEiT-3-base weights in bf16, and the batch


@pytest.mark.slow
@pytest.mark.skipif(not GPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh gpu (~6 GB)")
def test_evaluation_step_with_cudnn_for_four_gpus(tmp_path):
  """`run.py eval --attention cudnn`'s step for 4 H100s: jax's batching rule for its cuDNN call (the
  evaluator vmaps BEiT-3 over images) failed on the key-padding mask broadcast over heads, which the CPU
  tests' stand-in for cuDNN does not reach; and no cross-GPU operation."""
  summary = _compile(GPU_PYTHON, tmp_path, "--platform", "gpu", "--size", "tiny", "--attention", "cudnn")
  assert summary["devices"] == 4 and "H100" in summary["device_kind"]
  assert summary["collectives"] == {}
