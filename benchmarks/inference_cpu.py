"""Inference speed and memory: evf-jax vs the PyTorch reference, same weights, same machine, one run.

    python -m benchmarks.inference_cpu [--size base] [--repeats 3] [--threads 2]
    python -m benchmarks.inference_cpu --family evf-sam2 [--sam2-size evf-sam2] [--rounds 3] [--parts]

Measures (medians; each side runs in its own process so peak memory is its own):
  a. one image + one prompt, end to end (decoded RGB array -> mask at the original size);
  b. one image + 8 prompts: the reference as EVF-SAM's inference runs it (everything per prompt);
     ours sets the image once and predicts the 8 prompts in one call;
  c. first-call time (compile) in a fresh process, without and with the persistent compilation cache;
  d. peak resident memory of each process.
Ratios are ours / reference (lower is better).

`--family evf-sam2` measures EVF-SAM2 (Hiera-L + BEiT-3-L at `evf-sam2`) instead, in ONE process: the PyTorch
reference (sam2 + torchscale + EVF-SAM2's glue, `evf_testing.sam2_reference`, as the original's inference():
the uint8 squash to 1024, SAM-2 features, BEiT-3, the multimask decoder, the best mask by IoU, bilinear to the
original size) and ours (`Predictor`: set_image + predict) alternate for --rounds rounds, one image + one prompt
end to end, medians; on a loaded machine only such same-run ratios mean anything. `--parts` also times the parts
alone the same way: SAM-2's image encoder (trunk + neck + the decoder's high-res projections; compiled as
`Predictor` compiles it), BEiT-3 + the projector, the mask decoder. `--products` then times the encoder's
dense-layer products alone, shape by shape, in XLA, torch and numpy: the time those products alone need.

Both frameworks allocate their large intermediate buffers afresh on every call, and glibc serves
blocks over its mmap threshold (at most 32 MiB) with new pages that the kernel must fault in and zero:
on the 2-core VM this was measured on, 1-4 million page faults per call. With `--tuned-malloc`, (a) is
measured once more with both sides under the same glibc settings (`TUNED_MALLOC_ENV`: no mmap, no
trimming, one arena), which keep freed memory in the heap for reuse.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from evf_testing import benchmarking as common

# glibc malloc tunables (read at process start) that keep freed memory for reuse instead of returning it
# to the kernel: the freed heap is then never given back, so a process stays at its peak size.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_ARENA_MAX": "1"}


def faults_of(fn) -> int:
  """Minor page faults this process takes during one fn()."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def run_reference(args) -> dict:
  import torch
  torch.set_num_threads(args.threads)
  from evf_jax.tokenizer import TextTokenizer
  from evf_testing import evf_reference as ref
  config, model, ckpt = common.build_models(args.size, args.workdir)
  tok = TextTokenizer(os.path.join(ckpt, "tokenizer"))
  image = common.test_image()
  ids = [[tok.encode(p)] for p in common.PROMPTS]

  def one():
    ref.reference_predict(model, config, image, ids[0])

  def eight():  # EVF-SAM's inference(): the image encoder runs again for every prompt
    for i in range(8):
      ref.reference_predict(model, config, image, ids[i])

  one_s, one_all = common.timed(one, args.repeats, warmup=1)
  faults = faults_of(one)
  if args.one_only:
    return dict(one=one_s, one_all=one_all, faults_per_call=faults)
  eight_s, eight_all = common.timed(eight, max(1, args.repeats_eight))
  return dict(one=one_s, one_all=one_all, faults_per_call=faults, eight=eight_s, eight_all=eight_all,
              peak_rss_mib=common.peak_rss_mib(), torch=torch.__version__)


def run_ours(args) -> dict:
  import jax

  from evf_jax.predictor import Predictor
  config, _, ckpt = common.build_models(args.size, args.workdir)
  image = common.test_image()
  t0 = time.perf_counter()
  p = Predictor.from_checkpoint(ckpt, compilation_cache_dir=args.cache)
  load_s = time.perf_counter() - t0

  def one():
    p.set_image(image)
    r = p.predict(common.PROMPTS[:1])
    assert r.masks.shape == (1, *image.shape[:2])

  def eight():
    p.set_image(image)
    p.predict(common.PROMPTS[:8])

  if args.first_call_only:
    compile_times = p.precompile(image.shape[:2], 1, 16)
    t0 = time.perf_counter()
    one()
    return dict(load=load_s, compile=compile_times, first_call_after_precompile=time.perf_counter() - t0)
  t0 = time.perf_counter()
  one()  # compiles embed, decode (1 prompt) and upsample
  first_call = time.perf_counter() - t0
  one_s, one_all = common.timed(one, args.repeats)
  faults = faults_of(one)
  if args.one_only:
    return dict(one=one_s, one_all=one_all, faults_per_call=faults)
  eight_s, eight_all = common.timed(eight, args.repeats, warmup=1)
  return dict(load=load_s, first_call=first_call, one=one_s, one_all=one_all, faults_per_call=faults, eight=eight_s,
              eight_all=eight_all, peak_rss_mib=common.peak_rss_mib(), jax=jax.__version__,
              backend=jax.default_backend())


def run_evf_sam2(args) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from convert.evf_sam2 import convert_evf_sam2
  from evf_jax import runtime
  from evf_jax.beit3.preprocess import beit_image
  from evf_jax.evf_sam2 import EvfSam2, EvfSam2Config
  from evf_jax.predictor import Predictor
  from evf_jax.sam2.transforms import preprocess
  from evf_jax.tokenizer import TextTokenizer
  from evf_testing import torch_reference as tr
  from evf_testing.evf_reference import beit_input
  from evf_testing.sam2_reference import (
    build_torch_evf_sam2,
    reference_evf_sam2,
    reference_sam2_decode,
    reference_sam2_maps,
    reference_text_feature,
    sam2_input,
  )
  torch.set_num_threads(args.threads)
  t0 = time.perf_counter()
  config = EvfSam2Config.preset(args.sam2_size)
  model = build_torch_evf_sam2(config, 0)
  params = convert_evf_sam2(tr.state_dict_numpy(model), config).params
  tok = TextTokenizer(common.train_spm(os.path.join(args.workdir, "spm")))
  p = Predictor(config, params, tok)
  del params
  print(f"built and converted EVF-SAM2 {args.sam2_size} in {time.perf_counter() - t0:.1f} s", flush=True)
  image = common.test_image()
  prompt = common.PROMPTS[2]
  ids = np.asarray([tok.encode(prompt)])
  s = config.sam2

  def ours():
    p.set_image(image)
    return p.predict([prompt]).logits[0]

  def reference():
    sam_x = sam2_input(image, s.image_size, s.pixel_mean, s.pixel_std)
    return reference_evf_sam2(model, sam_x, beit_input(image, config.beit3.img_size), ids, image.shape[:2])[0][0]

  t0 = time.perf_counter()
  got = ours()
  first = time.perf_counter() - t0
  err = float(np.abs(got - reference()).max())
  print(f"first call (compiles) {first:.1f} s; logits vs reference: max abs difference {err:.3g}", flush=True)
  pairs = {"end to end, 1 image + 1 prompt": (ours, reference)}
  if args.parts:
    sam = model.visual_model
    m = EvfSam2(config)
    sam_x = sam2_input(image, s.image_size, s.pixel_mean, s.pixel_std)
    beit_x = beit_input(image, config.beit3.img_size)
    x = jnp.asarray(preprocess(image, s))[None]
    bx = jnp.asarray(beit_image(image, config.beit3.img_size))[None]
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool)
    def embed(q, x):
      return m.apply({"params": q}, x, method="embed_image")

    enc = runtime.jit_eigen_dots(embed)  # as `Predictor` compiles EVF-SAM2's encoder (Eigen dots on the CPU)
    text = jax.jit(lambda q, b, i, k: m.apply({"params": q}, b, i, k, method="text_prompts"))
    dec = jax.jit(lambda q, f, pr: m.apply({"params": q}, f, pr, method="decode"))
    feats, prompts = enc(p.params, x), text(p.params, bx, jids, jmask)

    def ref_enc():
      return reference_sam2_maps(sam, sam_x)

    def ref_text():
      return reference_text_feature(model, beit_x, ids)

    with torch.no_grad():
      maps, feat = ref_enc(), ref_text()

    def ref_dec():
      return reference_sam2_decode(sam, maps, feat)

    pairs["SAM-2 image encoder (Hiera + neck)"] = (lambda: jax.block_until_ready(enc(p.params, x)), ref_enc)
    pairs["BEiT-3 + projector"] = (lambda: jax.block_until_ready(text(p.params, bx, jids, jmask)), ref_text)
    pairs["mask decoder (multimask)"] = (lambda: jax.block_until_ready(dec(p.params, feats, prompts)), ref_dec)
  with torch.no_grad():
    times = common.alternate(pairs, args.rounds)
  print(f"\nEVF-SAM2 {args.sam2_size}, fp32, {args.threads} torch threads, 640x480 image, {args.rounds} rounds "
        f"alternating in one process; jax {jax.__version__}, torch {torch.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  common.print_ratios(times)
  print(f"first call (compiles): {first:.1f} s; logits vs reference: max abs difference {err:.3g}")
  if args.products:
    enc_ref = times["SAM-2 image encoder (Hiera + neck)"][1]
    dense_products_alone(embed, (p.params, x), enc_ref, args.rounds)


def product_times(rows: int, k: int, n: int, rng, rounds: int) -> dict:
  """Median seconds of one (rows, k) @ (k, n) float32 product per library."""
  import jax
  import numpy as np
  import torch

  from evf_jax import runtime
  a, b = rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, n), np.float32)
  ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
  xla = (jax.jit(jax.numpy.matmul), runtime.jit_eigen_dots(jax.numpy.matmul))
  return {
    "XLA (best dot library)": min(common.timed(lambda f=f: jax.block_until_ready(f(ja, jb)), rounds, 1)[0]
                                  for f in xla),
    "torch.matmul": common.timed(lambda: torch.matmul(ta, tb), rounds, 1)[0],
    "numpy (its BLAS)": common.timed(lambda: a @ b, rounds, 1)[0],
  }


def dense_products_alone(fn, args, reference_s: float, rounds: int) -> None:
  """The dense layers' products of `fn(*args)`, each shape jitted alone (XLA with either dot library, best of
  the two) against torch.matmul and numpy's BLAS on the same shapes: how much of the reference's time the
  products alone would take each library, which bounds what any arrangement of the rest can reach."""
  import numpy as np
  products = common.dense_products(fn, *args)
  rng = np.random.default_rng(0)
  sums, flops = {}, 0.0
  for (rows, k, n), count in sorted(products.items()):
    for name, t in product_times(rows, k, n, rng, rounds).items():
      sums[name] = sums.get(name, 0.0) + count * t
    flops += 2.0 * rows * k * n * count
  print(f"\nthe encoder's dense layers: {sum(products.values())} products of {len(products)} shapes, "
        f"{flops / 1e12:.3f} TFLOP; each shape alone, median of {rounds}; reference encoder {reference_s:.3f} s")
  print(f"{'products alone with':<28} {'[s]':>8} {'GFLOP/s':>8} {'/ reference encoder':>20}")
  for name, t in sums.items():
    print(f"{name:<28} {t:>8.3f} {flops / t / 1e9:>8.1f} {t / reference_s:>20.3f}")


def child(role: str, args, extra=(), env_extra=None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--size", args.size, "--workdir", args.workdir,
         "--repeats", str(args.repeats), "--repeats-eight", str(args.repeats_eight), "--threads", str(args.threads),
         *extra]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if args.threads:
    env.update(OMP_NUM_THREADS=str(args.threads))
  env.update(env_extra or {})
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if r.returncode:
    raise RuntimeError(f"{role} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
  return common.parse_results(r.stdout)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="base", choices=["tiny", "base"])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--repeats-eight", type=int, default=1, help="repeats of the reference's 8-prompt run (slow)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "evf_jax_bench"))
  ap.add_argument("--role", default="parent", choices=["parent", "reference", "ours"])
  ap.add_argument("--cache", default=None)
  ap.add_argument("--first-call-only", action="store_true")
  ap.add_argument("--one-only", action="store_true", help="child: measure (a) only")
  ap.add_argument("--tuned-malloc", action="store_true",
                  help="also measure (a) with both sides under the same glibc malloc settings (TUNED_MALLOC_ENV)")
  ap.add_argument("--family", default="evf-sam", choices=["evf-sam", "evf-sam2"])
  ap.add_argument("--sam2-size", default="evf-sam2", choices=["toy", "evf-sam2"], help="--family evf-sam2's size")
  ap.add_argument("--rounds", type=int, default=3, help="--family evf-sam2: alternating rounds")
  ap.add_argument("--parts", action="store_true", help="--family evf-sam2: time the parts too")
  ap.add_argument("--products", action="store_true",
                  help="--family evf-sam2 with --parts: also time the encoder's dense-layer products alone per library")
  ap.add_argument("--xla-flags", default="", help="--family evf-sam2: appended to XLA_FLAGS before jax starts, e.g. "
                  "--xla-flags=--xla_cpu_experimental_ynn_fusion_type= (what the video tracker sets per program)")
  args = ap.parse_args()
  if args.products and not (args.family == "evf-sam2" and args.parts):
    ap.error("--products needs --family evf-sam2 --parts (it compares with the reference encoder's time)")
  if args.family == "evf-sam2":
    if args.xla_flags:
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    os.makedirs(args.workdir, exist_ok=True)
    run_evf_sam2(args)
    return
  if args.role == "reference":
    common.emit(run_reference(args))
    return
  if args.role == "ours":
    common.emit(run_ours(args))
    return

  os.makedirs(args.workdir, exist_ok=True)
  common.build_models(args.size, args.workdir)  # convert once, outside any timing
  ref = child("reference", args)
  ours = child("ours", args)
  cache = tempfile.mkdtemp(prefix="evf_jax_cc_")
  cold = child("ours", args, ["--cache", cache, "--first-call-only"])
  warm = child("ours", args, ["--cache", cache, "--first-call-only"])
  if args.tuned_malloc:
    ref_tuned = child("reference", args, ["--one-only"], TUNED_MALLOC_ENV)
    ours_tuned = child("ours", args, ["--one-only"], TUNED_MALLOC_ENV)

  def row(name, o, r):
    print(f"{name:<44} {o:>10.3f} {r:>12.3f} {o / r:>8.3f}")

  print(f"\nEVF-SAM {args.size}, fp32, {args.threads} threads, 640x480 image; jax {ours['jax']} ({ours['backend']}), "
        f"torch {ref['torch']}")
  print(f"{'':<44} {'ours [s]':>10} {'reference [s]':>12} {'ratio':>8}")
  row("a. 1 image + 1 prompt, end to end", ours["one"], ref["one"])
  row("b. 1 image + 8 prompts", ours["eight"], ref["eight"])
  def total(r, stage):
    return sum(v[stage] for v in r["compile"].values())
  cc, wc = total(cold, "compile"), total(warm, "compile")
  print(f"{'c. XLA compile, new process, empty cache':<44} {cc:>10.2f}   (+ trace/lower {total(cold, 'trace_lower'):.2f})")
  print(f"{'   ... second process, persistent cache':<44} {wc:>10.2f}   speed-up {cc / wc:.1f}x "
        f"(+ trace/lower {total(warm, 'trace_lower'):.2f})")
  print(f"{'   first call incl. compile, no cache':<44} {ours['first_call']:>10.2f}   (steady call {ours['one']:.2f})")
  print(f"{'d. peak resident memory [MiB]':<44} {ours['peak_rss_mib']:>10.0f} {ref['peak_rss_mib']:>12.0f} "
        f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:>8.3f}")
  print(f"   page faults per call (ours; reference)          {ours['faults_per_call']}; {ref['faults_per_call']}")
  if args.tuned_malloc:
    row("a'. as (a), both with TUNED_MALLOC_ENV", ours_tuned["one"], ref_tuned["one"])
    print(f"   page faults per call (ours; reference)          {ours_tuned['faults_per_call']}; "
          f"{ref_tuned['faults_per_call']}")
    print(f"raw a': ours {ours_tuned['one_all']}; reference {ref_tuned['one_all']}")
  print(f"raw: ours one {ours['one_all']}, eight {ours['eight_all']}; reference one {ref['one_all']}, "
        f"eight {ref['eight_all']}")


if __name__ == "__main__":
  main()
