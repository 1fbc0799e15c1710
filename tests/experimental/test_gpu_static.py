"""benchmarks/experimental/gpu_static.py: its cost table on small GPU-style HLO modules written out here, and its errors.
The deviceless compile itself needs jax's CUDA plugin (scripts/setup_static_env.sh gpu, ~6 GB), which the
test environment does not have on purpose; the slow-tier test that runs it skips where it is missing."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from benchmarks.experimental import gpu_static

pytestmark = pytest.mark.experimental

# A cuBLAS GEMM with its workspace, the same GEMM as a Triton fusion, a cuDNN flash attention on (B=2, T=8, N=4) with q/k 24 wide and v 16,
# a loop fusion and a bitcast (no kernel). Shapes as XLA prints them after GPU compilation.
HLO = """
HloModule m

%fused_convert (p: bf16[64,16]) -> f32[64,16] {
  %p = bf16[64,16]{1,0} parameter(0)
  ROOT %c = f32[64,16]{1,0} convert(%p)
}

%gemm_fusion_dot.7_computation (parameter_0: bf16[64,32], parameter_1: bf16[32,16]) -> bf16[64,16] {
  %parameter_0 = bf16[64,32]{1,0} parameter(0)
  %parameter_1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[64,32], w: bf16[32,16], q: bf16[2,8,4,24], k: bf16[2,8,4,24], v: bf16[2,8,4,16]) -> f32[64,16] {
  %x = bf16[64,32]{1,0} parameter(0)
  %w = bf16[32,16]{1,0} parameter(1)
  %q = bf16[2,8,4,24]{3,2,1,0} parameter(2)
  %k = bf16[2,8,4,24]{3,2,1,0} parameter(3)
  %v = bf16[2,8,4,16]{3,2,1,0} parameter(4)
  %cublas-lt-matmul.1 = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %gte = bf16[64,16]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  %gemm_fusion_dot.7 = bf16[64,16]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_fusion_dot.7_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %dot_product_attention_fwd.2 = (bf16[2,4,8,16]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %flat = bf16[64,16]{1,0} bitcast(%gte)
  ROOT %loop_convert_fusion.3 = f32[64,16]{1,0} fusion(%flat), kind=kLoop, calls=%fused_convert
}
"""


def test_kernel_table():
  rows = {r["name"]: r for r in gpu_static.kernels(HLO)}
  assert set(rows) == {"cublas-lt-matmul.1", "gemm_fusion_dot.7", "dot_product_attention_fwd.2", "loop_convert_fusion.3"}
  gemm, attn, conv = rows["cublas-lt-matmul.1"], rows["dot_product_attention_fwd.2"], rows["loop_convert_fusion.3"]
  assert (gemm["kind"], gemm["flops"]) == ("gemm", 2.0 * 64 * 16 * 32)
  assert gemm["bytes"] == 2 * (64 * 32 + 32 * 16 + 64 * 16)  # the s8 workspace is not traffic
  triton = rows["gemm_fusion_dot.7"]
  assert (triton["kind"], triton["flops"], triton["bytes"]) == ("gemm", gemm["flops"], gemm["bytes"])
  assert (attn["kind"], attn["flops"]) == ("attention", 2.0 * 2 * 4 * 8 * 8 * (24 + 16))
  assert attn["bytes"] == 2 * (2 * 8 * 4 * (24 + 24 + 16) + 2 * 4 * 8 * 16)
  assert (conv["kind"], conv["bytes"]) == ("memory", 64 * 16 * (2 + 4))


def test_summary_rates():
  s = gpu_static.summarise(gpu_static.kernels(HLO), gemm_tflops=1.0, attention_tflops=2.0, bandwidth_tbps=0.5)
  assert s["gemm"]["kernels"] == 2 and s["attention"]["kernels"] == 1 and s["memory"]["kernels"] == 1
  assert s["gemm"]["est_ms"] == pytest.approx(2 * 2 * 64 * 16 * 32 / 1e12 * 1e3)
  assert s["attention"]["est_ms"] == pytest.approx(2 * 2 * 4 * 8 * 8 * 40 / 2e12 * 1e3)
  assert s["memory"]["est_ms"] == pytest.approx(64 * 16 * 6 / 0.5e12 * 1e3)
  assert s["total_est_ms"] == pytest.approx(s["gemm"]["est_ms"] + s["attention"]["est_ms"] + s["memory"]["est_ms"])
  assert list(s["memory_by_name"]) == ["loop_convert_fusion"]
  # A kernel takes the longer of compute and traffic: on a starved memory system the GEMMs are traffic-bound.
  slow = gpu_static.summarise(gpu_static.kernels(HLO), gemm_tflops=1.0, attention_tflops=2.0, bandwidth_tbps=1e-6)
  assert slow["gemm"]["est_ms"] == pytest.approx(s["gemm"]["gb"] * 1e9 / 1e6 * 1e3)


def test_without_the_cuda_plugin(capsys):
  pytest.importorskip("jax")
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
    pytest.skip("this environment has jax's CUDA plugin")
  except ImportError:
    pass
  assert gpu_static.main(["--batch", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "setup_static_env.sh gpu" in err[0]


def test_does_not_overwrite(tmp_path, capsys):
  mine = tmp_path / "summary.json"
  mine.write_text("keep")
  with pytest.raises(SystemExit) as e:
    gpu_static.main(["--json", str(mine)])
  assert e.value.code == 2 and mine.read_text() == "keep"
  assert "not overwriting" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tiles", "global_block_q"], "expected key=integer pairs"),
    (["--tiles", "global_block_q=64"], "--tiles are for the Pallas kernels"),
])
def test_tiles_errors(argv, message, capsys):
  """Caught before anything is compiled (or the CUDA plugin looked for)."""
  with pytest.raises(SystemExit) as e:
    gpu_static.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


PALLAS_HLO = """
ENTRY %main (qkv: bf16[2,8,3,4,16], s: bf16[2,8,4,64]) -> bf16[2,8,4,16] {
  %qkv = bf16[2,8,3,4,16]{4,3,2,1,0} parameter(0)
  %s = bf16[2,8,4,64]{3,2,1,0} parameter(1)
  %pallas_call.1 = bf16[2,8,4,16]{3,2,1,0} custom-call(%s), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/some_other_kernel"}
  %pallas_call.2 = bf16[2,6,10,4,16]{4,3,2,1,0} custom-call(%s), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/sam_windowed_rel_pos_attention_w4"}
  ROOT %pallas_call.0 = bf16[2,8,4,16]{3,2,1,0} custom-call(%qkv, %qkv, %qkv, %s), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/sam_global_rel_pos_attention"}
}
"""


def test_pallas_kernels():
  """Our attention kernels are costed as attention (QK and PV at their head dim; the windowed one per padded
  window, 6 x 10 -> 2 x 3 windows of 4 x 4) and for the plane of qkv each of their qkv operands reads;
  another Triton call by its whole operands' bytes only."""
  rows = {r["name"]: r for r in gpu_static.kernels(PALLAS_HLO)}
  ours, other, windowed = rows["pallas_call.0"], rows["pallas_call.1"], rows["pallas_call.2"]
  assert (ours["kind"], ours["flops"]) == ("attention", 2.0 * 2 * 4 * 8 * 8 * (16 + 16))
  qkv, scores, out = (2 * 2 * 8 * n for n in (3 * 4 * 16, 4 * 64, 4 * 16))
  assert ours["bytes"] == pytest.approx(3 * qkv / 3 + scores + out)  # one plane of qkv per operand
  # QK and PV at 16, and the rel-pos selection product at K = 2 * 8 (4-wide windows' rows and columns)
  assert (windowed["kind"], windowed["flops"]) == ("attention", 2.0 * 2 * 6 * 4 * 16 * 16 * (16 + 16 + 16))
  assert (other["kind"], other["flops"]) == ("custom", 0.0)
  assert other["bytes"] == 2 * (2 * 8 * 4 * 64 + 2 * 8 * 4 * 16)


SLICE_HLO = """
%fused_slice (p0: bf16[4,6], p1: bf16[4,2]) -> bf16[4,2] {
  %p0 = bf16[4,6]{1,0} parameter(0)
  %t = bf16[6,4]{1,0} transpose(%p0), dimensions={1,0}
  %s = bf16[2,4]{1,0} slice(%t), slice={[2:4], [0:4]}
  %u = bf16[4,2]{1,0} transpose(%s), dimensions={1,0}
  %p1 = bf16[4,2]{1,0} parameter(1)
  ROOT %a = bf16[4,2]{1,0} add(%u, %p1)
}

ENTRY %main (x: bf16[4,6], y: bf16[4,2]) -> bf16[4,2] {
  %x = bf16[4,6]{1,0} parameter(0)
  %y = bf16[4,2]{1,0} parameter(1)
  ROOT %loop_slice_fusion = bf16[4,2]{1,0} fusion(%x, %y), kind=kLoop, calls=%fused_slice
}
"""


def test_fusions_are_charged_for_what_they_slice():
  """A third of x is sliced (behind a transpose) and y is read whole."""
  computation = SLICE_HLO[SLICE_HLO.index("%fused_slice"):SLICE_HLO.index("ENTRY")]
  assert gpu_static.read_fractions(computation) == pytest.approx({0: 1 / 3, 1: 1.0})
  row, = gpu_static.kernels(SLICE_HLO)
  assert row["bytes"] == pytest.approx(2 * (24 / 3 + 8 + 8))


LOOP_HLO = """
%fused_add (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %a = f32[4,8]{1,0} add(%p, %p)
}

%body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %loop_add_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %loop_add_fusion)
}

%cond (t: (s32[], f32[4,8])) -> pred[] {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: f32[4,8]) -> (s32[], f32[4,8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %c = s32[] constant(0)
  %t = (s32[], f32[4,8]{1,0}) tuple(%c, %x)
  %counted = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %uncounted = (s32[], f32[4,8]{1,0}) while(%counted), condition=%cond, body=%body
}
"""


def test_loops_count_their_body_times_the_trips():
  rows = gpu_static.kernels(LOOP_HLO)
  counted, uncounted = rows
  assert (counted["name"], counted["kind"], counted["trips"]) == ("loop_add_fusion", "memory", 5)
  assert counted["bytes"] == 5 * (4 * 8 * 4) * 2
  assert (uncounted["name"], uncounted["kind"]) == ("uncounted", "opaque")


# What ptxas -v printed for two of our kernels (sm_90a), one of them spilling, with an advisory.
PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sam_global_rel_pos_attention' for 'sm_90a'
ptxas info    : Function properties for sam_global_rel_pos_attention
    40 bytes stack frame, 40 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size
ptxas info    : Compile time = 358.978 ms
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1605 by compiler to allow use of registers in GMMA in function 'sam_windowed_rel_pos_attention_w14'
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1765 by compiler to allow use of registers in GMMA in function 'sam_windowed_rel_pos_attention_w14'
ptxas info    : Compiling entry function 'sam_windowed_rel_pos_attention_w14' for 'sm_90a'
ptxas info    : Function properties for sam_windowed_rel_pos_attention_w14
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 238 registers, used 1 barriers
"""


def test_ptxas_report():
  report = gpu_static.parse_ptxas(PTXAS)
  assert report == {
      "sam_global_rel_pos_attention": dict(stack=40, spill_stores=40, spill_loads=40, registers=255),
      "sam_windowed_rel_pos_attention_w14": dict(stack=0, spill_stores=0, spill_loads=0, registers=238,
                                                 advisories={"C7519": 2}),
  }


GPU_STATIC_PYTHON = pathlib.Path(__file__).resolve().parents[1] / ".venv-gpu-static" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not GPU_STATIC_PYTHON.exists(), reason="needs scripts/setup_static_env.sh gpu (~6 GB)")
@pytest.mark.parametrize("attention", ["cudnn", "cudnn+pallas"])
def test_deviceless_compile_for_an_h100(attention, tmp_path):
  """The encoder's GPU paths compiled for an H100 with XLA's real GPU compiler (no GPU needed): the only check
  here that the cuDNN calls and the Pallas kernels lower for the GPU, which the CPU tests play with stand-ins
  and the interpreter; ptxas then assembles every kernel for sm_90a. SAM-B at batch 1: 12 blocks, 4 of them
  global."""
  out = tmp_path / "summary.json"
  proc = subprocess.run([str(GPU_STATIC_PYTHON), "-m", "benchmarks.experimental.gpu_static", "--size", "base", "--batch", "1",
                         "--attention", attention, "--ptxas", "--json", str(out)],
                        cwd=GPU_STATIC_PYTHON.parents[2], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(out.read_text())
  assert summary["attention"]["kernels"] == 12  # one attention kernel per block, cuDNN or ours
  assert summary["gemm"]["tflop"] > 0.4 and summary["total_est_ms"] > 0
  ours = {k: v for k, v in summary["ptxas"].items() if "rel_pos_attention" in k}
  assert len(summary["ptxas"]) > 10 and all(v.get("registers") for v in summary["ptxas"].values())
  if attention == "cudnn+pallas":  # both kernels assembled for sm_90a, at their default tiles without spills
    assert set(ours) == {"sam_global_rel_pos_attention", "sam_windowed_rel_pos_attention_w14"}
    assert all(v["spill_stores"] == 0 and v["spill_loads"] == 0 for v in ours.values()), ours
  else:
    assert not ours
