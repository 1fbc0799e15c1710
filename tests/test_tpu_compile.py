"""benchmarks/tpu_compile.py: its collective count and errors here; the compile for a TPU slice itself needs
libtpu (scripts/setup_tpu_static_env.sh), which the test environment does not have on purpose, so that test
is in the slow tier and skips where .venv-tpu-static is missing."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from benchmarks import tpu_compile


def test_collectives_counted_once_per_operation():
  hlo = """
  %ag = f32[8,4]{1,0} all-gather(%x), dimensions={0}
  %ars = f32[4]{0} all-reduce-start(%y), to_apply=%add
  %ard = f32[4]{0} all-reduce-done(%ars)
  %cp = f32[4]{0} collective-permute(%z), source_target_pairs={{0,1}}
  %fusion.all-gather-like = f32[4]{0} fusion(%w), kind=kLoop, calls=%f
  """
  assert tpu_compile.collectives(hlo) == {"all-gather": 1, "all-reduce": 1, "collective-permute": 1}
  assert tpu_compile.collectives("%a = f32[4]{0} add(%x, %y)") == {}


def test_without_libtpu(capsys):
  assert tpu_compile.main(["--size", "tiny"]) == 2
  assert "needs libtpu" in capsys.readouterr().err


def test_does_not_overwrite(tmp_path, capsys):
  mine = tmp_path / "summary.json"
  mine.write_text("keep")
  with pytest.raises(SystemExit) as e:
    tpu_compile.main(["--json", str(mine)])
  assert e.value.code == 2 and mine.read_text() == "keep"


TPU_STATIC_PYTHON = pathlib.Path(__file__).resolve().parents[1] / ".venv-tpu-static" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not TPU_STATIC_PYTHON.exists(), reason="needs scripts/setup_tpu_static_env.sh (~1.5 GB)")
def test_evaluation_step_compiles_for_a_tpu_slice_without_communication(tmp_path):
  """SAM-B + BEiT-3-base, bf16, over the 4 chips of a v5e 2x2 slice: it lowers for TPU, and the data-parallel
  step holds no cross-chip operation (the global blocks' chunked attention once gathered every image's
  q, k and v onto every chip)."""
  out = tmp_path / "summary.json"
  proc = subprocess.run([str(TPU_STATIC_PYTHON), "benchmarks/tpu_compile.py", "--size", "base", "--topology",
                         "v5e:2x2", "--json", str(out)],
                        cwd=TPU_STATIC_PYTHON.parents[2], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(out.read_text())
  assert summary["chips"] == 4 and "TPU" in summary["device_kind"]
  assert summary["collectives"] == {}
  assert summary["per_chip_gb"]["argument"] > 0.3  # SAM-B + BEiT-3-base weights in bf16, and the batch
