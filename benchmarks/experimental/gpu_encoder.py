"""Where the SAM-H image encoder's time goes on a GPU (bf16). One command, ~3 minutes on an H100.

    python -m benchmarks.experimental.gpu_encoder [--batch 8] [--out DIR]

1. The chip's two ceilings as this problem sees them: a device-to-device pass (bytes read + written per
   second) and bf16 matmuls of the encoder's four Linear shapes.
2. The attention core of one global block (4096 tokens) and one windowed block (25 windows x 196 tokens
   per image), each way we can run it: cuDNN flash attention with the rel-pos terms folded into q and k
   (`fold_rel_pos`) and V kept at head dim 80 (`flash_attention_wide_qk`: what attention="cudnn"
   runs), the same with V zero-padded to q/k's width, with the folded width padded to a multiple of 128
   instead of 8, with the rel-pos bias materialised as a (B, N, T, T) tensor, XLA (`rel_pos_attention`), and
   plain cuDNN attention without any rel-pos terms (a floor). Then the flash kernel alone on q/k already at
   the folded width (what the fold's own passes cost is the difference). Each is checked against float32
   on the same inputs. Then each block kind from the fused qkv output to proj's input, as the encoder meets
   it: the cuDNN path (slices, fold, window partition and merge included) against the experimental Pallas
   kernels (`pallas_attention`: head dim 80, the rel-pos bias added in the kernel, windows gathered from
   and scattered to the grid) in three tile configurations each.
3. The whole encoder at `--batch`, cuDNN and XLA attention (kernels stored in bf16, as `Predictor` runs it),
   and a profile of the cuDNN one: GPU time per kernel, grouped, from the profiler's trace. `--impls` may
   add `cudnn+pallas` (the Pallas kernels for all blocks) and `cudnn+pallas_global` (global blocks only),
   which are profiled too.
4. `Predictor` end to end in bf16 with cuDNN attention (BEiT-3's padding mask included), 1 and 8 prompts.
5. With --xla-flag-sets, section 3 (--impls without XLA attention, with profiles) again under each set of
   XLA flags, each in a fresh process (XLA reads its flags once). An entry may hold `gelu=tanh_approx` too:
   that child runs the encoder with the tanh GELU (--gelu), which XLA can hand to cuBLASLt as a BIAS_GELU
   epilogue (`benchmarks/experimental/gpu_static.py` shows it doing so for all 32 MLPs under jax 0.10.2); its profile
   says whether it did on the GPU's jax, and what the epilogue costs.
With --out, the log's numbers go to DIR/gpu_encoder.json and the raw trace to DIR.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")

import numpy as np

from benchmarks import gpu
from evf_testing import benchmarking as common
from evf_testing import profiling
from evf_jax import flops as model_flops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = gpu.RESULTS  # one results dict, logger and section runner with gpu.py
log, section = gpu.log, gpu.section


def timeit(fn, *args):
  return gpu.pipelined_time(lambda: fn(*args), repeats=20)


@section("ceilings")
def ceilings(b, sam, copy_mib):
  import jax
  import jax.numpy as jnp
  g, d = sam.embedding_size, sam.embed_dim
  mlp = int(sam.mlp_ratio * d)
  key = jax.random.key(0)
  x = jax.random.normal(key, (copy_mib << 19,), jnp.bfloat16)
  t = timeit(jax.jit(lambda x: x * 2), x)
  RESULTS["copy_GBps"] = 2 * x.nbytes / t / 1e9
  log(f"elementwise pass over {copy_mib} MiB bf16: {RESULTS['copy_GBps']:.0f} GB/s (read + write)")
  del x
  n_win, tw = model_flops.windows_per_image(sam)
  win_rows = b * n_win * tw  # the reference's qkv and proj run on the windows' padding too
  for name, m, k, n in (("qkv", win_rows, d, 3 * d), ("proj", win_rows, d, d), ("mlp1", b * g * g, d, mlp),
                        ("mlp2", b * g * g, mlp, d)):
    a = jax.random.normal(key, (m, k), jnp.bfloat16)
    w = jax.random.normal(key, (k, n), jnp.bfloat16)
    t = timeit(jax.jit(lambda a, w: a @ w), a, w)
    RESULTS[f"matmul_{name}_tflops"] = 2 * m * k * n / t / 1e12
    log(f"matmul {name} ({m}x{k}) @ ({k}x{n}) bf16: {t * 1e3:.2f} ms, {2 * m * k * n / t / 1e12:.0f} TFLOP/s")


@section("attention")
def attention_core(b, g, sam):
  import jax
  import jax.numpy as jnp
  from evf_jax import layers
  from evf_jax.sam import rel_pos_attention as rpa
  n, hd = sam.num_heads, sam.embed_dim // sam.num_heads
  scale = hd ** -0.5

  def fold(q, k, v, rh, rw, hw):  # V zero-padded to q/k's width, through the public API
    q_ext, k_ext = rpa.fold_rel_pos(q, k, rh, rw, hw)
    return rpa.flash_attention_padded_v(q_ext, k_ext, v, scale)

  def fold_unpadded_v(q, k, v, rh, rw, hw):  # what attention="cudnn" runs
    q_ext, k_ext = rpa.fold_rel_pos(q, k, rh, rw, hw)
    return rpa.flash_attention_wide_qk(q_ext, k_ext, v, scale)

  def bias(q, k, v, rh, rw, hw):
    bias = rpa.decomposed_rel_pos_bias(q, rh, rw, hw, hw).astype(q.dtype)
    return layers.attention(q, k, v, bias=bias, implementation="cudnn")

  def xla(q, k, v, rh, rw, hw):
    return rpa.rel_pos_attention(q, k, v, rh, rw, hw)

  def plain(q, k, v, rh, rw, hw):
    return layers.attention(q, k, v, implementation="cudnn")

  def fold_to_128(q, k, v, rh, rw, hw):  # the folded width padded to a multiple of 128 instead of 8
    q_ext, k_ext = rpa.fold_rel_pos(q, k, rh, rw, hw, multiple=128)
    return rpa.flash_attention_wide_qk(q_ext, k_ext, v, scale)

  ways = {"cudnn_fold": fold, "cudnn_fold_unpadded_v": fold_unpadded_v, "cudnn_fold_to_128": fold_to_128,
          "cudnn_bias": bias, "xla": xla, "cudnn_no_rel_pos": plain}
  rng = np.random.default_rng(0)
  n_win, _ = model_flops.windows_per_image(sam)
  for kind, batch, side in (("global", b, g), ("windowed", b * n_win, sam.window_size)):
    t = side * side
    q, k, v = (jnp.asarray(rng.normal(size=(batch, t, n, hd)), jnp.bfloat16) for _ in range(3))
    rh, rw = (jnp.asarray(0.3 * rng.normal(size=(2 * side - 1, hd)), jnp.float32) for _ in range(2))
    ref = jax.jit(lambda *a: xla(*a, (side, side)))(*(x.astype(jnp.float32) for x in (q, k, v)), rh, rw)
    useful = 4 * batch * n * t * t * hd
    for name, fn in ways.items():
      _time_attention(f"attn_{kind}_{name}", f"{kind} attention ({batch}x{t} tokens) {name}",
                      jax.jit(lambda *a, fn=fn: fn(*a, (side, side))), (q, k, v, rh, rw), ref, useful)
    # The flash kernel alone on inputs already at the folded width (q/k: D + h + w rounded up to 8, or 128;
    # v: D): what is left of cuDNN_fold_unpadded_v once building q_ext/k_ext costs nothing.
    for width in sorted({-(-(hd + 2 * side) // 8) * 8, -(-(hd + 2 * side) // 128) * 128}):
      qw, kw = (jnp.asarray(rng.normal(size=(batch, t, n, width)) * (hd / width) ** 0.25, jnp.bfloat16)
                for _ in range(2))
      ref_w = _attention_f32(qw, kw, v, scale)
      _time_attention(f"attn_{kind}_kernel_only_qk{width}", f"{kind} attention ({batch}x{t} tokens) kernel only, "
                      f"q/k width {width}", jax.jit(lambda q, k, v: rpa.flash_attention_wide_qk(q, k, v, scale)),
                      (qw, kw, v), ref_w, useful)


# (block_q, num_warps) of the experimental Pallas kernels (benchmarks/pallas_attention.py), per block kind,
# the kernels' defaults first. None spills registers at SAM-H's sizes (`gpu_static.py --ptxas`, sm_90a);
# the global kernel's 128 queries on 4 warps, which spill, are left out.
PALLAS_CONFIGS = {"global": ((128, 8), (64, 4), (64, 8)), "windowed": ((64, 4), (64, 8), (128, 8))}


@section("attention_from_qkv")
def blocks_from_qkv(b, sam):
  """Each block kind's attention from the fused qkv output to the input of proj, as the encoder meets it
  (`image_encoder.block_attention`): the cuDNN path (slices, fold, and for windows the partition and merge
  included) against the experimental Pallas kernels in a few tile configurations. On CPU the kernels run in
  Pallas's interpreter."""
  import jax
  import jax.numpy as jnp
  from benchmarks.experimental import pallas_attention as pa
  from evf_jax.sam import image_encoder as ie
  g, n, hd, ws = sam.embedding_size, sam.num_heads, sam.embed_dim // sam.num_heads, sam.window_size
  rng = np.random.default_rng(1)
  qkv = jnp.asarray(rng.normal(size=(b, g, g, 3 * n * hd)), jnp.bfloat16)
  qkv_bias = jnp.asarray(rng.normal(size=(3 * n * hd,)), jnp.float32)
  interpret = jax.default_backend() != "gpu"
  for kind, window in (("global", 0), ("windowed", ws)):
    side = window or g
    rh, rw = (jnp.asarray(0.3 * rng.normal(size=(2 * side - 1, hd)), jnp.float32) for _ in range(2))

    def run(impl, attention=ie.block_attention, window=window):  # one jitted function per variant
      return jax.jit(lambda x, bias, rh, rw: attention(x, bias, rh, rw, num_heads=n, window_size=window,
                                                        attention=impl).reshape(b, g * g, n, hd))

    args = (qkv, qkv_bias, rh, rw)
    ref = run(None)(qkv.astype(jnp.float32), qkv_bias, rh, rw)
    tokens = g * g if kind == "global" else model_flops.windows_per_image(sam)[1]
    useful = 4 * b * n * g * g * tokens * hd  # per query: its grid's or its (padded) window's keys
    label = f"{kind} block from qkv (batch {b})"
    _time_attention(f"attn_{kind}_from_qkv_cudnn", f"{label} cuDNN, folded", run("cudnn"), args, ref, useful)
    for block_q, warps in PALLAS_CONFIGS[kind]:
      key = f"attn_{kind}_from_qkv_pallas_q{block_q}_w{warps}"
      prefix = "global_" if kind == "global" else "window_"
      tiles = {prefix + "block_q": block_q, prefix + "num_warps": warps}
      # strict: a block the kernels do not tile raises here instead of quietly timing the cuDNN fallback.
      fn = run("cudnn", pa.with_pallas(ie.block_attention, kinds=(kind,), interpret=interpret, strict=True,
                                       **tiles))
      try:
        jax.eval_shape(fn, *args)
      except NotImplementedError as e:  # e.g. the tiny test model's 6 x 6 global grid
        RESULTS[key + "_skipped"] = str(e)
        log(f"{key}: skipped ({e})")
        continue
      _time_attention(key, f"{label} Pallas, block_q {block_q}, {warps} warps", fn, args, ref, useful)


def _attention_f32(q, k, v, scale):
  """softmax(scale q k^T) v in float32 for (B, T, N, *) inputs whose q/k and v widths may differ."""
  import jax
  import jax.numpy as jnp
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  p = jax.nn.softmax(jnp.einsum("btnd,bsnd->bnts", q, k) * scale, axis=-1)
  return jnp.einsum("bnts,bsnd->btnd", p, v)


def _time_attention(key, label, f, args, ref, useful):
  """Times f(*args), checks it against the float32 `ref`, records RESULTS[key]; a failure is recorded too."""
  import jax.numpy as jnp
  try:
    out = f(*args)
    tm = timeit(f, *args)
  except Exception as e:
    RESULTS[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"{label}: FAILED {RESULTS[f'{key}_error']}")
    return
  rel = float(jnp.linalg.norm((out.astype(jnp.float32) - ref).ravel()) / jnp.linalg.norm(ref.ravel()))
  RESULTS[key] = dict(ms=tm * 1e3, tflops=useful / tm / 1e12, rel_err_vs_fp32=rel)
  log(f"{label}: {tm * 1e3:.2f} ms, {useful / tm / 1e12:.0f} useful TFLOP/s, |out - fp32| / |fp32| = {rel:.2e}")


def kernel_table(trace_dir, iterations, key="profile"):
  """GPU time per kernel from the profiler's trace.json.gz: top kernels and rough groups, per iteration."""
  path = profiling.trace_file(trace_dir)
  events = profiling.load_trace(path)
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_thread = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "GPU" in procs.get(e["pid"], ""):
      per_thread[(e["pid"], e["tid"])] += e.get("dur", 0)
  for key, us in per_thread.most_common(8):
    log(f"  trace line {procs[key[0]]} / {threads.get(key, key[1])}: {us / 1e3 / iterations:.1f} ms/iter")
  streams = [k for k in per_thread if "stream" in threads.get(k, "").lower()]
  if not streams and per_thread:  # unknown trace layout: take the busiest GPU line
    streams = [per_thread.most_common(1)[0][0]]
  kernels = collections.Counter()
  ops = {}
  for e in events:
    if e.get("ph") == "X" and (e["pid"], e["tid"]) in streams:
      kernels[e["name"]] += e.get("dur", 0)
      ops.setdefault(e["name"], (e.get("args") or {}).get("hlo_op", ""))
  total = sum(kernels.values())
  groups = collections.Counter()
  for name, us in kernels.items():
    low = name.lower()
    group = ("attention (cuDNN)" if any(s in low for s in ("fmha", "flash", "sdpa")) else
             "attention (Pallas)" if "rel_pos_attention" in low else
             "matmul and conv" if any(s in low for s in ("nvjet", "gemm", "xmma", "cutlass", "gmma")) else
             "other fusions/copies")
    groups[group] += us
  log(f"  GPU kernel time {total / 1e3 / iterations:.1f} ms/iter over the kernel streams")
  for group, us in groups.most_common():
    log(f"  {group}: {us / 1e3 / iterations:.1f} ms/iter ({100 * us / max(total, 1):.0f}%)")
  top = [dict(name=name[:120], hlo_op=ops[name], ms_per_iter=us / 1e3 / iterations) for name, us in kernels.most_common(40)]
  for row in top[:30]:
    log(f"    {row['ms_per_iter']:7.2f} ms  {row['name'][:90]}  [{row['hlo_op'][:40]}]")
  RESULTS[f"{key}_groups_ms"] = {k: v / 1e3 / iterations for k, v in groups.items()}
  RESULTS[f"{key}_top_kernels"] = top
  return path


@section("encoder")
def encoder(cfg, params, b, out_dir, impls=("cudnn", "xla")):
  """The encoder in bf16 with its kernels stored in bf16 (as `Predictor` runs it), timed; the first
  implementation that runs is profiled, and the Pallas experiments too ("cudnn+pallas": the experimental
  Pallas kernels of `pallas_attention` for all blocks; "cudnn+pallas_global" for the global ones only)."""
  import jax
  import jax.numpy as jnp
  from benchmarks.experimental import pallas_attention as pa
  from benchmarks.experimental.gpu_static import PALLAS_KINDS
  from evf_jax.evf import EvfSam, cast_kernels
  from evf_jax.sam import image_encoder as ie
  sam = cfg.sam
  imgs = jax.random.normal(jax.random.key(1), (b, sam.img_size, sam.img_size, 3), jnp.bfloat16)
  flops = b * model_flops.sam_encoder(sam)
  params = cast_kernels(params, jnp.bfloat16)
  profiled = False
  block_attention = ie.block_attention
  for impl in impls:
    pallas = impl in PALLAS_KINDS
    if pallas:  # the module looks the function up when it is traced, which the first call below does
      ie.block_attention = pa.with_pallas(block_attention, kinds=PALLAS_KINDS[impl],
                                          interpret=jax.default_backend() != "gpu")
    try:
      model = EvfSam(cfg, attention="cudnn" if pallas else impl, dtype=jnp.bfloat16)
      fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EvfSam.embed_image))
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, imgs))
        first = time.perf_counter() - t0
        t = timeit(fn, params, imgs)
      except Exception as e:
        RESULTS[f"encoder_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"encoder attention={impl}: FAILED {RESULTS[f'encoder_{impl}_error']}")
        continue
      RESULTS[f"encoder_{impl}_b{b}"] = dict(ms=t * 1e3, tflops=flops / t / 1e12, first_call_s=first)
      log(f"encoder attention={impl}, batch {b}: {t * 1e3:.1f} ms, {b / t:.1f} img/s, "
          f"{flops / t / 1e12:.0f} TFLOP/s (hand-counted), first call {first:.0f} s")
      if not profiled or pallas:  # the first path that runs (cuDNN on NVIDIA GPUs), and the experiment
        key = "profile" if not profiled else f"profile_{impl}"
        profiled = True
        trace_dir = tempfile.mkdtemp()
        iterations = 3
        with jax.profiler.trace(trace_dir):
          for _ in range(iterations):
            jax.block_until_ready(fn(params, imgs))
        log(f"profile of the encoder, attention={impl}:")
        path = kernel_table(trace_dir, iterations, key)
        if out_dir and os.path.getsize(path) < (15 << 20):
          shutil.copy(path, os.path.join(out_dir, f"encoder_{impl}.trace.json.gz"))
    finally:
      ie.block_attention = block_attention


@section("xla_flag_sets")
def xla_flag_sets(args, flag_sets):
  """The encoder section again in a fresh process per XLA_FLAGS string (XLA reads its flags once, at
  start-up), for --impls without XLA attention (cuDNN, and the Pallas experiments when asked for); each
  child's numbers land under RESULTS["xla_flags"][flags]."""
  RESULTS["xla_flags"] = {}
  for i, flags in enumerate(flag_sets):
    out = os.path.join(args.out or tempfile.mkdtemp(), f"xla_flags_{i}")
    xla = " ".join(t for t in flags.split() if not t.startswith("gelu="))
    gelu = [t.split("=", 1)[1] for t in flags.split() if t.startswith("gelu=")]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla}".strip())
    # As a module from the repository root: run as a file, `benchmarks` would be fairscale's package of that name.
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.experimental.gpu_encoder", "--size", args.size, "--batch", str(args.batch),
           "--sections", "encoder", "--impls", ",".join(i for i in args.impls.split(",") if i != "xla") or "cudnn",
           "--out", out, "--gelu", (gelu or [args.gelu])[-1]]
    log(f"XLA_FLAGS={env['XLA_FLAGS']!r}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    child = os.path.join(out, "gpu_encoder.json")
    if proc.returncode != 0 or not os.path.exists(child):
      RESULTS["xla_flags"][flags] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
      log(f"  FAILED: {RESULTS['xla_flags'][flags]['error']}")
      continue
    r = json.load(open(child))
    RESULTS["xla_flags"][flags] = {k: v for k, v in r.items() if k.startswith(("encoder", "profile", "gelu"))
                                   and not k.endswith("top_kernels")}


@section("predictor")
def predictor(cfg, params):
  from evf_jax.predictor import Predictor
  from evf_jax.tokenizer import TextTokenizer
  tok = TextTokenizer(common.train_spm(tempfile.mkdtemp()))
  image = common.test_image()
  pred = Predictor(cfg, params, tok, precision="bf16", attention="cudnn")
  for n in (1, 8):
    def run():
      pred.set_image(image)
      return pred.predict(common.PROMPTS[:n])
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t, _ = common.timed(run, 5, warmup=1)
    RESULTS[f"predictor_bf16_cudnn_{n}"] = dict(ms=t * 1e3, first_call_s=first)
    log(f"Predictor bf16 attention=cudnn: {n} prompt(s) {t * 1e3:.1f} ms (first call {first:.0f} s)")


def random_params(cfg, encoder_only=False):
  """Seeded random weights drawn with numpy (only speed is measured here): `init_params` compiles the
  initialisers of the whole model, which took 3.5 minutes on the H100 machine. encoder_only: just SAM's
  image encoder (all that `embed_image` reads), a third of the draw."""
  import jax
  from evf_jax.evf import abstract_params
  shapes = abstract_params(cfg)
  if encoder_only:
    shapes = {"sam": {"image_encoder": shapes["sam"]["image_encoder"]}}
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jax.device_put((0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)),
                      shapes)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", default="evf-sam")
  ap.add_argument("--out", default=None, help="folder for gpu_encoder.json and the profiler trace")
  ap.add_argument("--sections", default="ceilings,attention,encoder,predictor")
  ap.add_argument("--copy-mib", type=int, default=1024, help="size of the elementwise pass in the ceilings")
  ap.add_argument("--impls", default="cudnn,xla",
                  help="attention implementations for the encoder section: cudnn, xla, cudnn+pallas, "
                       "cudnn+pallas_global")
  ap.add_argument("--xla-flag-sets", default="",
                  help="';'-separated XLA_FLAGS strings: after the other sections, the encoder runs again "
                       "(--impls without xla) in a fresh process under each; an entry may add gelu=tanh_approx")
  ap.add_argument("--gelu", default="exact", choices=("exact", "tanh_approx"),
                  help="the GELU of the encoder sections: SAM's exact one, or the tanh approximation (NOT what "
                       "SAM computes; timed to see what cuBLASLt's GELU epilogue would buy)")
  args = ap.parse_args()
  if args.gelu != "exact":
    from evf_jax import layers
    layers.gelu = gpu.GELU_FORMS[args.gelu]
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    gpu.OUT_PATH = os.path.join(args.out, "gpu_encoder.json")
  import jax
  from evf_jax.evf import EvfConfig
  cfg = EvfConfig.preset(args.size)
  sam = cfg.sam
  dev = jax.devices()[0]
  RESULTS.update(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__, batch=args.batch,
                 date=time.strftime("%Y-%m-%d"), gelu=args.gelu)
  log(f"device {RESULTS['device']}, jax {jax.__version__}")
  sections = args.sections.split(",")
  if "ceilings" in sections:
    ceilings(args.batch, sam, args.copy_mib)
  if "attention" in sections:
    attention_core(args.batch, sam.embedding_size, sam)
    blocks_from_qkv(args.batch, sam)
  if "encoder" in sections or "predictor" in sections:
    params = random_params(cfg, encoder_only="predictor" not in sections)
    if "encoder" in sections:
      encoder(cfg, params, args.batch, args.out, tuple(args.impls.split(",")))
    if "predictor" in sections:
      predictor(cfg, params)
  flag_sets = [f.strip() for f in args.xla_flag_sets.split(";") if f.strip()]
  if flag_sets:
    xla_flag_sets(args, flag_sets)


if __name__ == "__main__":
  main()
