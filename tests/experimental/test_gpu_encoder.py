"""benchmarks/experimental/gpu_encoder.py, run at tiny size on CPU with XLA standing in for cuDNN (see
tests/test_benchmarks.py for why): every section runs and writes its numbers."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu
from benchmarks.experimental import gpu_encoder
from evf_testing import cudnn_stand_in

pytestmark = pytest.mark.experimental


@pytest.fixture
def bench(monkeypatch):
  calls = cudnn_stand_in.install(monkeypatch)
  monkeypatch.setattr(gpu, "OUT_PATH", None)
  monkeypatch.setattr(gpu, "RESULTS", {})
  monkeypatch.setattr(gpu_encoder, "RESULTS", gpu.RESULTS)

  def run(main, argv):
    monkeypatch.setattr(sys, "argv", ["bench"] + argv)
    main()
    assert calls["cudnn"] > 0  # the cuDNN rows really took the cuDNN path
  return run


def _no_errors(results):
  errors = {k: v for k, v in results.items() if k.endswith("_error")}
  assert not errors, errors


def test_gpu_encoder_py_every_section_runs(bench, tmp_path):
  bench(gpu_encoder.main, ["--size", "tiny", "--batch", "2", "--out", str(tmp_path / "new_dir"),
                           "--copy-mib", "4", "--impls", "cudnn,xla,cudnn+pallas,cudnn+pallas_global",
                           "--xla-flag-sets",
                           "--xla_cpu_enable_fast_math=false; --xla_no_such_flag; gelu=tanh_approx"])
  r = json.load(open(tmp_path / "new_dir" / "gpu_encoder.json"))
  # The flag sets run in child processes, which have no cuDNN stand-in: on CPU only their plumbing is
  # checked (the child ran and reported; an unknown flag is a recorded failure, not a lost run).
  flags = r.pop("xla_flags")
  assert set(flags) == {"--xla_cpu_enable_fast_math=false", "--xla_no_such_flag", "gelu=tanh_approx"}
  assert "cuDNN is not detected" in flags["--xla_cpu_enable_fast_math=false"]["encoder_cudnn_error"]
  assert flags["--xla_cpu_enable_fast_math=false"]["gelu"] == "exact"
  assert flags["gelu=tanh_approx"]["gelu"] == "tanh_approx" and "encoder_cudnn_error" in flags["gelu=tanh_approx"]
  assert "exit" in flags["--xla_no_such_flag"]["error"]
  _no_errors(r)
  assert r["copy_GBps"] > 0 and r["matmul_mlp2_tflops"] > 0
  for kind in ("global", "windowed"):
    for name in ("cudnn_fold", "cudnn_fold_unpadded_v", "cudnn_fold_to_128", "cudnn_bias", "xla"):
      assert r[f"attn_{kind}_{name}"]["rel_err_vs_fp32"] < 2e-2, (kind, name)
    # Without its rel-pos terms attention is another function: the check must see that.
    assert r[f"attn_{kind}_cudnn_no_rel_pos"]["rel_err_vs_fp32"] > 0.1
    kernel_only = [k for k in r if k.startswith(f"attn_{kind}_kernel_only_qk")]
    assert len(kernel_only) == 2 and all(r[k]["rel_err_vs_fp32"] < 2e-2 for k in kernel_only), kernel_only
  for key in ("encoder_cudnn_b2", "encoder_xla_b2", "encoder_cudnn+pallas_b2", "encoder_cudnn+pallas_global_b2",
              "predictor_bf16_cudnn_1", "predictor_bf16_cudnn_8", "profile_groups_ms",
              "profile_cudnn+pallas_groups_ms", "profile_cudnn+pallas_global_groups_ms"):
    assert key in r, key
  # The tiny model's global grid (6 x 6) has key rows of 6, which the global kernel does not tile: recorded as
  # skipped, not failed. Its 4 x 4 windows (head dim 16) are the windowed kernel's, run in the interpreter.
  for kind in ("global", "windowed"):
    assert r[f"attn_{kind}_from_qkv_cudnn"]["rel_err_vs_fp32"] < 2e-2
    for q, w in gpu_encoder.PALLAS_CONFIGS[kind]:
      key = f"attn_{kind}_from_qkv_pallas_q{q}_w{w}"
      if kind == "global":
        assert key + "_skipped" in r and key not in r, key
      else:
        assert r[key]["rel_err_vs_fp32"] < 2e-2, key
  assert (tmp_path / "new_dir" / "encoder_cudnn.trace.json.gz").exists()
