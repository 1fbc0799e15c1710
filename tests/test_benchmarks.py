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


@pytest.mark.slow
def test_gpu_py_sam2_rows(bench, tmp_path):
  """EVF-SAM2's rows (`--family evf-sam2`) at toy size: the image end to end against the reference, and video
  frames/s against sam2's video predictor, both with the same weights."""
  out = tmp_path / "gpu.json"
  bench(gpu.main, ["--family", "evf-sam2", "--sam2-size", "toy", "--video-frames", "3", "--video-hw", "40", "48",
                   "--video-chunk", "2", "--out", str(out)])
  r = json.load(open(out))
  _no_errors(r)
  for key in ("sam2_ours_bf16", "sam2_ours_bf16_cudnn", "sam2_ours_fp32", "sam2_reference_fp32", "sam2_reference_bf16",
              "sam2_video_ours_bf16_cudnn", "sam2_video_ours_fp32", "sam2_video_reference_fp32",
              "sam2_video_reference_bf16"):
    assert key in r, key
  assert "encoder_cudnn_b1" not in r  # EVF-SAM's rows did not run
  assert r["sam2_ours_fp32_vs_reference_fp32_gpu"] < 1e-3
  assert r["sam2_video_ours_fp32_vs_reference_fp32_gpu"] < 1e-2
  for name in ("sam2_ours_bf16", "sam2_ours_bf16_cudnn", "sam2_video_ours_bf16_cudnn"):
    assert r[f"{name}_vs_fp32"]["mask_agreement"] > 0.95, r[f"{name}_vs_fp32"]
  assert r["sam2_video_ours_fp32"]["frames_per_s"] > 0


@pytest.mark.slow
def test_cpu_sam2_benchmarks_run(monkeypatch, capsys):
  """The CPU benchmarks' EVF-SAM2 image and video modes at toy size, parts included: they run and print ratios
  and parity."""
  from benchmarks import inference_cpu, video_cpu
  video_cpu.main(["--size", "toy", "--frames", "3", "--hw", "40", "48", "--chunk", "2", "--parts"])
  text = capsys.readouterr().out
  assert "ratio ours/reference" in text and "memory attention" in text and "memory encoder" in text
  err = float(text.split("max abs logit difference ")[1].split(",")[0])
  assert err < 2e-3, text
  monkeypatch.setattr(sys, "argv", ["bench", "--family", "evf-sam2", "--sam2-size", "toy", "--rounds", "1", "--parts",
                                     "--products"])
  inference_cpu.main()
  text = capsys.readouterr().out
  assert "SAM-2 image encoder" in text and "BEiT-3" in text and "mask decoder" in text
  assert "XLA (best dot library)" in text and "torch.matmul" in text
  assert float(text.split("max abs difference ")[1].split()[0]) < 1e-4, text


def test_dense_products_counts_dense_layers_and_scan_steps():
  """`--products` reads the dense layers' products from the jaxpr: a Dense on (2, 5, 3) rows is one (10, 3, 4)
  product; a loop of 3 steps counts 3 times; attention-like batched products are not dense layers."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from evf_testing.benchmarking import dense_products
  dense = nn.Dense(4)
  x = jnp.ones((2, 5, 3))
  params = dense.init(jax.random.PRNGKey(0), x)

  def fn(params, x):
    y = dense.apply(params, x)
    y = jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), y, None, length=3)[0]
    return jnp.einsum("bqd,bkd->bqk", y, y)

  assert dense_products(fn, params, x) == {(10, 3, 4): 1, (10, 4, 4): 3}


def test_export_in_original_refuses_bad_input(tmp_path, capsys):
  """The check against the original repository: no checkout, or a workdir with files in it, is one line."""
  from benchmarks import export_in_original
  checkout = tmp_path / "EVF-SAM"
  (checkout / "model").mkdir(parents=True)
  (checkout / "model" / "evf_sam.py").touch()
  work = tmp_path / "work"
  work.mkdir()
  (work / "mine.txt").write_text("keep")
  for original, says in ((tmp_path, "not a checkout of hustvl/EVF-SAM"), (checkout, "is not empty")):
    assert export_in_original.main(["--original", str(original), "--workdir", str(work)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
  assert (work / "mine.txt").read_text() == "keep"
