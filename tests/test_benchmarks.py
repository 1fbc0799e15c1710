"""The GPU benchmark scripts, run at tiny size on CPU with XLA standing in for cuDNN.

A GPU session has minutes of device time; a script that fails in a section, or compares results that were
never produced, wastes them (one such comparison was lost on an H100 before this test existed). Timings
here mean nothing: only that every section runs, writes its numbers, and that the numerical checks the
scripts make hold.
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu
from evf_jax import flops as model_flops
from evf_jax.evf import EvfConfig
from evf_testing import cudnn_stand_in


@pytest.fixture
def bench(monkeypatch):
  calls = cudnn_stand_in.install(monkeypatch)
  monkeypatch.setattr(gpu, "OUT_PATH", None)
  monkeypatch.setattr(gpu, "RESULTS", {})

  def run(main, argv):
    monkeypatch.setattr(sys, "argv", ["bench"] + argv)
    main()
    assert calls["cudnn"] > 0  # the cuDNN rows really took the cuDNN path
  return run


def _no_errors(results):
  errors = {k: v for k, v in results.items() if k.endswith("_error")}
  assert not errors, errors


@pytest.mark.slow
def test_gpu_py_every_section_runs(bench, tmp_path):
  out = tmp_path / "gpu.json"
  bench(gpu.main, ["--size", "tiny", "--batch-sizes", "1,2", "--out", str(out), "--gelu-forms", "tanh_approx"])
  r = json.load(open(out))
  _no_errors(r)
  for key in ("encoder_cudnn_b1", "encoder_cudnn_b2", "encoder_xla_b2", "encoder_cudnn_b2_gelu_tanh_approx",
              "ours_bf16", "ours_bf16_cudnn", "ours_fp32", "reference_fp32", "reference_bf16",
              "ours_bf16_cudnn_stages"):
    assert key in r, key
  assert set(r["ours_bf16_cudnn_stages"]) == {"host_prep", "embed", "decode_1", "decode_8", "upsample_1",
                                              "upsample_8", "to_host_1", "to_host_8"}
  assert r["encoder_cudnn_b2"]["flops"] == 2 * model_flops.sam_encoder(EvfConfig.preset("tiny").sam)
  # The two attention paths agree (both bf16: rounding only), and ours matches the reference in fp32.
  assert r["encoder_cudnn_vs_xla_rel_err"] < 2e-2
  assert r["ours_fp32_vs_reference_fp32_gpu"] < 1e-3
  for name in ("ours_bf16", "ours_bf16_cudnn"):
    assert r[f"{name}_vs_fp32"]["mask_agreement"] > 0.98, r[f"{name}_vs_fp32"]
