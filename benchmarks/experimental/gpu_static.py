"""What the SAM image encoder compiles to on an H100, on a machine without a GPU.

    bash scripts/setup_static_env.sh gpu          # once: .venv-gpu-static with jax's CUDA plugin (~6 GB)
    .venv-gpu-static/bin/python -m benchmarks.experimental.gpu_static [--batch 8] [--gelu erf|tanh] [--xla-flags '...']
        [--attention cudnn+pallas [--tiles window_block_q=128,window_num_warps=8]] [--ptxas]

XLA's GPU compiler runs deviceless: jax's CUDA plugin compiles for a compile-only topology built from a
target description of the chip (`TARGETS`), so the program is the one XLA would build for the GPU, up to
autotuning. Each kernel of the compiled entry computation is listed with what it costs:
  - GEMMs (cuBLAS calls): FLOPs from their shapes, time at --gemm-tflops;
  - cuDNN flash attention: FLOPs 2 * B * N * T * S * (qk width + v width), time at --attention-tflops (so
    are the experimental Pallas kernels of `pallas_attention.py`, --attention cudnn+pallas);
  - other Triton custom calls: bytes only;
  - everything else (XLA's fusions, copies, cuDNN convolutions): bytes read + written, time at --bandwidth.
Each kernel takes the longer of its compute and its traffic; the estimate is the plain sum over kernels: no
overlap, no launch gaps. It is for comparing variants of our code (the kernels launched are the program's;
times are only as good as the three rates), and it does not replace a measurement. What it cannot see:
  - autotuning: with no device XLA keeps its default choices. Triton GEMM fusions are off by default here,
    because on an H100 the autotuner gave every encoder GEMM to cuBLAS (run 2's profile);
  - exactly what a kernel reads: an XLA fusion is charged for the share of each operand its slices keep
    (`read_fractions`: q sliced out of the fused qkv output is a third of it) and for whole operands
    otherwise; custom calls (cuBLAS, cuDNN, Triton) for whole operands, except the Pallas kernels, which
    take the fused qkv output three times and are charged a third of it each time (the plane they read;
    re-reads of a head's keys by its query blocks are assumed to hit L2);
  - the XLA of the GPU machine: this compiles with the jax installed here, and XLA's fusion choices change
    between versions (flax's bf16 GELU is one pass under jax 0.10.2, was two under 0.11.2 on the H100).
With --ptxas, the CUDA toolkit's ptxas (from the plugin's CUDA wheels) assembles every kernel's PTX for
sm_90a and lists registers per thread and spills of our Pallas kernels and of any kernel that spills: the
one check of the kernels' tiles (--tiles) there is without a GPU.
Default rates, from run 2 on an H100 (README, Performance): 790 TFLOP/s, the encoder's big cuBLAS kernels
in its profile; 435 TFLOP/s, its cuDNN flash kernels over windowed and global blocks together; 2.3 TB/s, a
plain bf16 pass. With them, the code that run 3 timed at 113.4 ms (batch 8) is estimated at 104.2 ms: launch
gaps and the smaller GEMMs' lower rate are not in the model.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

from benchmarks import deviceless  # imports no jax: main() sets the environment first

# --attention values that put benchmarks/experimental/pallas_attention.py's kernels in place (gpu_encoder.py's --impls
# too): which block kinds go to them, cuDNN taking the rest. Here rather than there: this module must not
# import jax before main() has set the environment the compile-only plugin needs.
PALLAS_KINDS = {"cudnn+pallas": ("global", "windowed"), "cudnn+pallas_global": ("global",)}

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}  # no kernel of their own


def array_bytes(shape: str, skip_scratch: bool = False) -> int:
  """Bytes of the arrays in an HLO shape string (tuples summed). skip_scratch drops s8/u8 arrays: the
  workspace that cuBLAS and cuDNN calls return next to their result."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if skip_scratch and dtype in ("s8", "u8"):
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _dims(shape: str) -> list[int]:
  return [int(d) for d in filter(None, _ARRAY.search(shape).group(2).split(","))]


def _first_array(shape: str) -> str:
  return _ARRAY.search(shape).group(0)


def _elements(shape: str) -> int:
  """Elements of the first array in an HLO shape string."""
  n = 1
  for d in _dims(shape):
    n *= d
  return n


def _dot_flops(computation: str) -> float:
  """2 x output elements x contracted size of the `dot` in a fused computation's text (a Triton GEMM)."""
  shapes = {}
  for line in computation.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op == "dot":
      lhs = re.findall(r"%([\w.\-]+)", rest.split(")")[0])[0]
      lhs_dims = _dims(shapes[lhs])
      k = 1
      for d in re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line).group(1).split(","):
        k *= lhs_dims[int(d)]
      return 2.0 * _elements(shape) * k
  return 0.0


def read_fractions(computation: str) -> dict[int, float]:
  """For a fused computation's text: parameter number -> the fraction of it the fusion reads. A `slice` reads
  its output's share of its operand; other ops pass on what their users read (the most any user reads),
  and the root is read whole. E.g. a fusion that slices q out of the fused qkv output reads a third of it."""
  instrs, params = [], {}
  for line in computation.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0]) if op != "parameter" else []
    instrs.append((name, shape, op, operands, line.lstrip().startswith("ROOT")))
    if op == "parameter":
      params[name] = int(re.match(r"\s*(\d+)", rest).group(1))
  read = {name: 1.0 for name, *_, root in instrs if root}
  for name, shape, op, operands, _ in reversed(instrs):  # users come after their operands
    frac = read.get(name, 0.0)
    for o in operands:
      share = frac
      if op == "slice" and o == operands[0]:
        share = frac * _elements(shape) / max(1, _elements(next(i[1] for i in instrs if i[0] == o)))
      read[o] = max(read.get(o, 0.0), share)
  return {number: min(1.0, read.get(name, 1.0)) for name, number in params.items()}


def kernels(hlo_text: str) -> list[dict]:
  """One row per kernel of the entry computation: name, kind (gemm | attention | memory), bytes, flops.
  A while loop with a known trip count contributes its body's kernels, their bytes and FLOPs times the
  trips (`trips` says how many); other loops and calls are one `opaque` row."""
  computations = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^%([\w.\-]+) \(.*?^\}", hlo_text)}
  return _kernels(hlo_text[hlo_text.index("\nENTRY"):], computations)


def _kernels(computation: str, computations: dict[str, str], trips: int = 1) -> list[dict]:
  shapes: dict[str, str] = {}
  rows = []
  for line in computation.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in _FREE:
      continue
    loop = re.search(r'body=%([\w.\-]+).*"known_trip_count":\{"n":"(\d+)"', line) if op == "while" else None
    if loop and loop.group(1) in computations:
      rows += _kernels(computations[loop.group(1)], computations, trips * int(loop.group(2)))
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    target = re.search(r'custom_call_target="([^"]+)"', line)
    target = target.group(1) if target else ""
    fractions = {}
    if op == "fusion" and "kind=kCustom" not in line:  # XLA's own fusions: what they really read
      called = re.search(r"calls=%([\w.\-]+)", line)
      fractions = read_fractions(computations.get(called.group(1), "")) if called else {}
    elif re.search(r"sam_(global|windowed)_rel_pos_attention", line):
      # pallas_attention.py's kernels take the fused qkv output three times and read one plane of it each
      # time (their BlockSpecs), from HBM once if L2 holds a head's keys while its query blocks run
      fractions = {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    in_bytes = sum(fractions.get(i, 1.0) * array_bytes(shapes.get(o, ""), skip_scratch=True)
                   for i, o in enumerate(operands))
    out_bytes = array_bytes(shape, skip_scratch=True)
    flops, kind = 0.0, "memory"
    if "cublas" in target:
      kind = "gemm"
      contracting = re.search(r'"lhs_contracting_dimensions":\["(\d+)"', line)
      k = _dims(shapes[operands[0]])[int(contracting.group(1))]
      flops = 2.0 * _elements(shape) * k
    elif op == "fusion" and re.search(r'"kind":"__triton(_nested)?_gemm', line):
      kind = "gemm"  # a Triton GEMM (--xla_gpu_triton_gemm_any, or where cuBLAS does not apply)
      flops = _dot_flops(computations.get(re.search(r"calls=%([\w.\-]+)", line).group(1), ""))
    elif "fmha" in target.lower():
      kind = "attention"
      q, v = (_dims(shapes[o]) for o in (operands[0], operands[2]))
      kd = _dims(shapes[operands[1]])
      b, t, n = q[0], q[-3], q[-2]  # jax's cuDNN call takes (B, T, N, D)
      flops = 2.0 * b * n * t * kd[-3] * (q[-1] + v[-1])
    elif "sam_global_rel_pos_attention" in line:  # benchmarks/experimental/pallas_attention.py: QK and PV at D
      kind = "attention"
      b, t, n, d = _dims(_first_array(shape))
      flops = 2.0 * b * n * t * t * (d + d)
    elif "sam_windowed_rel_pos_attention_w" in line:  # per window, (B, H, W, N, D) out
      kind = "attention"
      ws = int(re.search(r"sam_windowed_rel_pos_attention_w(\d+)", line).group(1))
      b, h, w, n, d = _dims(_first_array(shape))
      windows = -(-h // ws) * -(-w // ws)
      # QK and PV at D, and the rel-pos selection product (K = 2 * next power of two of ws, as the
      # kernel's `rel_pos_width`; counted like cuDNN's folded q/k width)
      flops = 2.0 * b * windows * n * (ws * ws) ** 2 * (d + 2 * (1 << (max(ws, 8) - 1).bit_length()) + d)
    elif "triton" in target:
      kind = "custom"  # another Pallas/Triton kernel: its FLOPs are unknown here, its time counts bytes only
    elif op in ("while", "conditional", "call"):
      kind = "opaque"  # a loop of unknown trip count, a branch, a call: its kernels are not listed
    rows.append(dict(name=name, op=op, target=target, kind=kind, bytes=trips * (in_bytes + out_bytes),
                     flops=trips * flops, trips=trips))
  return rows


def summarise(rows: list[dict], gemm_tflops: float, attention_tflops: float, bandwidth_tbps: float) -> dict:
  """Totals per kind and the estimated time (ms) of each, by the rates given."""
  rate = {"gemm": gemm_tflops, "attention": attention_tflops}
  out: dict = {}
  for kind in ("gemm", "attention", "memory", "custom", "opaque"):
    sel = [r for r in rows if r["kind"] == kind]
    # Each kernel takes the longer of its compute and its traffic (the rel-pos score GEMMs, K = 80, are
    # bound by their output).
    ms = sum(max(r["flops"] / rate.get(kind, float("inf")), r["bytes"] / bandwidth_tbps) * 1e-9 for r in sel)
    out[kind] = dict(kernels=len(sel), tflop=sum(r["flops"] for r in sel) / 1e12,
                     gb=sum(r["bytes"] for r in sel) / 1e9, est_ms=ms)
  out["total_est_ms"] = sum(v["est_ms"] for v in out.values())
  groups = collections.defaultdict(lambda: [0, 0])
  for r in rows:
    if r["kind"] == "memory":
      g = groups[re.sub(r"[._]?\d+$", "", r["name"])]
      g[0] += 1
      g[1] += r["bytes"]
  out["memory_by_name"] = {k: dict(kernels=n, gb=b / 1e9)
                           for k, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])}
  return out


_PTXAS_LINE = {
    "entry": re.compile(r"(?:Compiling entry function|Function properties for) '?(\w+)'?"),
    "spills": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "advisory": re.compile(r"\((C\d+)\) (.*?)(?: in function '(\w+)')?$"),
}


def parse_ptxas(text: str) -> dict[str, dict]:
  """`ptxas -v`'s report, per kernel: registers per thread, stack and spill bytes, and its advisories (e.g.
  C7519: waits it put before wgmma, which serialise the tensor cores), counted by code."""
  out: dict[str, dict] = {}
  current = None
  for line in text.splitlines():
    if m := _PTXAS_LINE["advisory"].search(line):
      name = m.group(3) or current
      if name:
        advisories = out.setdefault(name, {}).setdefault("advisories", {})
        advisories[m.group(1)] = advisories.get(m.group(1), 0) + 1
    elif m := _PTXAS_LINE["entry"].search(line):
      current = m.group(1)
      out.setdefault(current, {})
    elif current and (m := _PTXAS_LINE["spills"].search(line)):
      out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    elif current and (m := _PTXAS_LINE["registers"].search(line)):
      out[current]["registers"] = int(m.group(1))
  return out


def _ptxas_report(dump_dir: str) -> dict[str, dict]:
  """Runs the CUDA toolkit's ptxas (from the plugin's CUDA wheels) on every PTX file XLA dumped."""
  import nvidia.cuda_nvcc
  ptxas = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
  report: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
      with open(path) as f:
        if ".entry" not in f.read():  # XLA also dumps an empty module
          continue
      proc = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                            capture_output=True, text=True, check=True)
      report.update(parse_ptxas(proc.stderr))
  return report


def _compile_encoder(args):
  """The encoder as `Predictor` runs it (bf16, kernels stored in bf16), compiled for the target."""
  import jax
  import jax.numpy as jnp

  from evf_jax import layers
  from evf_jax.evf import EvfConfig, EvfSam, abstract_params, cast_kernels

  device = deviceless.cuda_devices(args.target)[0]
  if args.gelu == "tanh":  # what XLA can fold into cuBLASLt's GELU epilogue
    layers.gelu = lambda x: jax.nn.gelu(x, approximate=True)
  if args.attention in PALLAS_KINDS:  # the experimental kernels in place, as gpu_encoder.py runs them
    from benchmarks.experimental import pallas_attention
    from evf_jax.sam import image_encoder
    try:
      image_encoder.block_attention = pallas_attention.with_pallas(image_encoder.block_attention,
                                                                   kinds=PALLAS_KINDS[args.attention],
                                                                   strict=True, **args.tiles)
    except TypeError as e:  # a --tiles key it does not know
      print(f"error: --tiles: {e}", file=sys.stderr)
      sys.exit(2)
  on = jax.sharding.SingleDeviceSharding(device)
  cfg = EvfConfig.preset(args.size)
  model = EvfSam(cfg, attention="cudnn" if args.attention in PALLAS_KINDS else args.attention,
                 dtype=jnp.bfloat16)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on),
                        jax.eval_shape(lambda p: cast_kernels(p, jnp.bfloat16), abstract_params(cfg)))
  s = cfg.sam.img_size
  images = jax.ShapeDtypeStruct((args.batch, s, s, 3), jnp.bfloat16, sharding=on)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EvfSam.embed_image))
  return fn.trace(params, images).lower().compile().as_text()


def _tiles(text: str) -> dict[str, int]:
  """--tiles a=1,b=2 -> {"a": 1, "b": 2}."""
  try:
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected key=integer pairs separated by commas") from None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="evf-sam", help="model preset (default evf-sam: SAM ViT-H)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--attention", default="cudnn", choices=("cudnn", "xla", *PALLAS_KINDS),
                  help="cudnn+pallas[_global]: all blocks [global blocks] through "
                       "benchmarks/experimental/pallas_attention.py, "
                       "cuDNN for the rest (the kernels' FLOPs at --attention-tflops, a rate never measured)")
  ap.add_argument("--gelu", default="erf", choices=("erf", "tanh"),
                  help="erf: SAM's exact GELU (ours); tanh: the approximation cuBLASLt can apply in its epilogue")
  ap.add_argument("--target", default="h100", choices=sorted(deviceless.TARGETS))
  ap.add_argument("--xla-flags", default="--xla_gpu_enable_triton_gemm=false",
                  help="XLA_FLAGS for the compile, given as --xla-flags='--flag=value ...' (the default turns "
                       "Triton GEMMs off: see the module docstring)")
  ap.add_argument("--gemm-tflops", type=float, default=790.0)
  ap.add_argument("--attention-tflops", type=float, default=435.0)
  ap.add_argument("--bandwidth", type=float, default=2.3, help="TB/s for memory-bound kernels")
  ap.add_argument("--top", type=int, default=12, help="memory-bound kernel groups to list")
  ap.add_argument("--hlo", help="write the compiled HLO text here")
  ap.add_argument("--json", help="write the summary here")
  ap.add_argument("--tiles", type=_tiles, default={},
                  help="the Pallas kernels' tiles, e.g. global_block_q=64,window_num_warps=8 (keys of "
                       "pallas_attention.with_pallas; its defaults otherwise)")
  ap.add_argument("--ptxas", action="store_true",
                  help="also run ptxas -v on the program's PTX and list registers and spills of the Pallas "
                       "kernels and of any kernel that spills (dumps it with --xla_dump_to to a temporary "
                       "directory)")
  args = ap.parse_args(argv)
  for path in (args.hlo, args.json):
    if path and os.path.exists(path):
      ap.error(f"{path} exists; not overwriting it")
  if args.tiles and args.attention not in PALLAS_KINDS:
    ap.error(f"--tiles are for the Pallas kernels: give --attention one of {sorted(PALLAS_KINDS)}")
  error = deviceless.use_compile_only_cuda(args.xla_flags, "benchmarks.experimental.gpu_static")
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  flags = os.environ["XLA_FLAGS"]
  with tempfile.TemporaryDirectory() as dump_dir:
    if args.ptxas:
      os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump_dir}"
    try:
      hlo = _compile_encoder(args)
    except NotImplementedError as e:  # --tiles the kernels do not tile the model's blocks with
      print(f"error: {e}", file=sys.stderr)
      return 2
    ptxas = _ptxas_report(dump_dir) if args.ptxas else None
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  summary = summarise(kernels(hlo), args.gemm_tflops, args.attention_tflops, args.bandwidth)
  summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("hlo", "json", "top")}
  print(f"SAM encoder ({args.size}), batch {args.batch}, bf16, attention={args.attention}, GELU {args.gelu}, "
        f"target {args.target}, XLA_FLAGS={flags!r}")
  for kind in ("gemm", "attention", "memory", "custom", "opaque"):
    s = summary[kind]
    if s["kernels"]:
      print(f"  {kind:9s} {s['kernels']:4d} kernels  {s['tflop']:7.2f} TFLOP  {s['gb']:7.2f} GB  "
            f"~{s['est_ms']:6.1f} ms")
  if summary["opaque"]["kernels"]:
    print("  (loops of unknown trip count, branches, calls: their kernels are not counted)")
  print(f"  estimated total ~{summary['total_est_ms']:.1f} ms (rates: {args.gemm_tflops:.0f} / "
        f"{args.attention_tflops:.0f} TFLOP/s, {args.bandwidth} TB/s)")
  print("  memory-bound kernels by HLO name:")
  for name, g in list(summary["memory_by_name"].items())[:args.top]:
    print(f"    {g['gb']:7.2f} GB  {g['kernels']:4d}x {name}")
  if ptxas is not None:
    summary["ptxas"] = ptxas
    pallas = set(re.findall(r"/(sam_\w+_rel_pos_attention\w*)/pallas_call", hlo))
    shown = {k: v for k, v in ptxas.items() if k in pallas or v.get("spill_stores") or v.get("spill_loads")}
    print(f"  ptxas -v (sm_90a), {len(ptxas)} kernels; our Pallas kernels and any that spill:")
    for name, v in sorted(shown.items()):
      advisories = ", ".join(f"{n}x {code}" for code, n in sorted(v.get("advisories", {}).items()))
      print(f"    {name}: {v.get('registers')} registers, spills {v.get('spill_stores', 0)} B stored / "
            f"{v.get('spill_loads', 0)} B loaded" + (f"; advisories {advisories}" if advisories else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
