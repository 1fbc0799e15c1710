"""GPU benchmark (one command, a few minutes on an H100/H200): evf-jax vs the PyTorch reference, same GPU.

    python -m benchmarks.gpu [--size evf-sam] [--out results.json]

Reports:
  1. SAM image-encoder throughput in bf16 (images/s, achieved TFLOP/s by hand-counted FLOPs, % of the
     chip's dense bf16 peak), for attention through cuDNN flash attention and through XLA, the two
     paths' embeddings against each other, and the encoder with other GELU code (--gelu-forms);
  2. end-to-end latency (decoded image -> masks at the original size) for 1 and 8 prompts, ours in fp32
     and bf16, and for bf16 with cuDNN the time of each stage alone (host preparation, the SAM embedding,
     BEiT-3 + decoder, the upsample, the copy to the host); the reference (segment-anything + torchscale +
     EVF glue, as EVF-SAM's inference runs it: everything per prompt) in fp32 and bf16 on the same GPU;
  3. the bf16 logit error against our fp32 logits.
With `--family evf-sam2` (or `both`), EVF-SAM2 (`--sam2-size`: Hiera-L + BEiT-3-L, or toy) instead (or as well):
  4. the image end to end as in 2 (ours bf16 per --e2e-attention and fp32 through `Predictor`; the reference,
     sam2 + torchscale + EVF-SAM2's glue, per prompt in fp32 and bf16 autocast) and the logit errors as in 3;
  5. video frames/s from a JPEG folder to logits at the original size (--video-frames of --video-hw): our
     `tracking.VideoTracker` in bf16 (the last --e2e-attention) and fp32, sam2's legacy video predictor with
     EVF-SAM2's overrides and the same SAM-2 weights in fp32 and bf16 autocast; bf16 vs fp32 and ours vs the
     reference logit errors.
The weights are random (seeded) and converted in memory with our converter.
Needs torch, segment-anything, torchscale and fairscale importable (scripts/gpu_carry.sh,
docs/performance.md#next-gpu-session); EVF-SAM2's rows
also sam2 (1.1.0) with hydra-core, omegaconf and iopath.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave room for the torch reference


import numpy as np

from evf_jax import flops as model_flops
from evf_testing import benchmarking as common

RESULTS: dict = {}
OUT_PATH = None  # --out: rewritten after every section, so a run stopped at its time limit keeps its numbers
TORCH_DEVICE = "cuda"  # "cpu" when there is no GPU (only to try the script at tiny size)


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def section(name):
  def deco(fn):
    def run(*a, **k):
      t0 = time.perf_counter()
      value = None
      try:
        value = fn(*a, **k)
      except Exception as e:  # keep going: one failing section must not lose the others
        RESULTS[name + "_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        log(f"{name} FAILED: {RESULTS[name + '_error']}")
        traceback.print_exc()
      log(f"{name} took {time.perf_counter() - t0:.1f} s")
      if OUT_PATH:
        with open(OUT_PATH, "w") as f:
          json.dump({k: v for k, v in RESULTS.items() if not k.startswith("_")}, f, indent=2, default=float)
      return value
    return run
  return deco


def sync_time(fn, repeats=5, warmup=2):
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def pipelined_time(fn, repeats=20, warmup=2):
  """Seconds per call of `fn` issued `repeats` times back to back with one wait at the end: jax dispatches
  asynchronously, so the host's per-call overhead (~0.1 ms) hides behind the device work. For sub-ms
  kernels, where `sync_time` (a wait after every call) counts that overhead: cuBLAS matmuls of the
  encoder's shapes timed 577-611 TFLOP/s one call at a time, while the encoder's profile put the same
  kernels at ~790."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()  # the previous output is freed once its computation is done; one stream runs them in order
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def gelu_erf_bf16(x):
  """SAM's exact GELU as flax writes it (in x's dtype), which XLA's GPU compiler ran as two passes."""
  import jax
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh_approx(x):
  """NOT what SAM computes: timed only to show what the tanh approximation would buy."""
  import jax
  return jax.nn.gelu(x, approximate=True)


GELU_FORMS = {"erf_bf16": gelu_erf_bf16, "tanh_approx": gelu_tanh_approx}


@section("encoder")
def bench_encoder(config, params, batch_sizes, peak, gelu_forms):
  """bf16 SAM image encoder, kernels stored in bf16 as `Predictor` stores them for bf16 inference."""
  import jax
  import jax.numpy as jnp
  from evf_jax import layers
  from evf_jax.evf import EvfSam, cast_kernels
  s = config.sam.img_size
  params = cast_kernels(params, jnp.bfloat16)
  outputs = {}
  runs = [(impl, b, None) for impl in ("cudnn", "xla") for b in (batch_sizes if impl == "cudnn" else batch_sizes[-1:])]
  runs += [("cudnn", batch_sizes[-1], form) for form in gelu_forms]
  exact_gelu = layers.gelu
  for impl, b, form in runs:
    layers.gelu = GELU_FORMS[form] if form else exact_gelu
    model = EvfSam(config, attention=impl, dtype=jnp.bfloat16)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EvfSam.embed_image))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, s, s, 3)), jnp.bfloat16)
    key = f"encoder_{impl}_b{b}" + (f"_gelu_{form}" if form else "")
    try:
      compiled = fn.lower(params, x).compile()
      cost = compiled.cost_analysis() or {}
      xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
      flops = b * model_flops.sam_encoder(config.sam)
      t = sync_time(lambda: compiled(params, x))
      if b == batch_sizes[-1] and not form:
        outputs[impl] = np.asarray(compiled(params, x), np.float32)
    except Exception as e:
      RESULTS[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(f"{key} failed: {RESULTS[key + '_error']}")
      continue
    finally:
      layers.gelu = exact_gelu
    tflops = flops / t / 1e12
    RESULTS[key] = dict(seconds=t, images_per_s=b / t, tflops=tflops, pct_peak=100 * tflops / peak if peak else None,
                        flops=flops, xla_flops=xla_flops)
    log(f"SAM encoder bf16 attention={impl} batch={b}{' GELU ' + form if form else ''}: {t * 1e3:.1f} ms, "
        f"{b / t:.2f} img/s, {tflops:.0f} TFLOP/s by hand-counted FLOPs ({100 * tflops / peak:.0f}% of "
        f"{peak:.0f}); XLA counts {xla_flops / b / 1e12:.2f} TFLOP/img")
  if len(outputs) == 2:  # the cuDNN path (rel-pos folded into q and k) against XLA's, both bf16
    a, r = outputs["cudnn"], outputs["xla"]
    RESULTS["encoder_cudnn_vs_xla_rel_err"] = float(np.linalg.norm(a - r) / np.linalg.norm(r))
    log(f"encoder embeddings, cuDNN vs XLA attention (both bf16): |a - b| / |b| = "
        f"{RESULTS['encoder_cudnn_vs_xla_rel_err']:.2e}")


def _bench_predictors(config, params, tokenizer, image, runs, prefix=""):
  """End-to-end latency of `Predictor` for each (precision, attention) in `runs`; keeps the logits.
  Returns the predictors that ran, by (precision, attention). prefix: of the result keys ("sam2_": EVF-SAM2)."""
  from evf_jax.predictor import Predictor
  predictors = {}
  for precision, impl in runs:
    p = Predictor(config, params, tokenizer, precision=precision, attention=impl)
    key = f"{prefix}ours_{precision}" + ("" if impl == "xla" else f"_{impl}")

    def one():
      p.set_image(image)
      return p.predict(common.PROMPTS[:1])

    def eight():
      p.set_image(image)
      return p.predict(common.PROMPTS[:8])
    try:
      t0 = time.perf_counter()
      one()
      first = time.perf_counter() - t0
      eight()
      t1, _ = common.timed(one, 5, warmup=1)
      t8, _ = common.timed(eight, 5, warmup=1)
      RESULTS["_logits_" + key] = eight().logits
    except Exception as e:
      RESULTS[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(f"{key} failed: {RESULTS[key + '_error']}")
      continue
    RESULTS[key] = dict(first_call=first, one_prompt=t1, eight_prompts=t8)
    log(f"{key}: first call {first:.1f} s, 1 prompt {t1 * 1e3:.1f} ms, 8 prompts {t8 * 1e3:.1f} ms")
    predictors[(precision, impl)] = p
  return predictors


bench_ours = section("ours_e2e")(_bench_predictors)
bench_sam2_ours = section("sam2_ours_e2e")(_bench_predictors)


@section("ours_stages")
def bench_stages(p, image):
  """Where one end-to-end call of Predictor `p` (already compiled) goes: the host's image preparation and
  each jitted program alone (waited for), for 1 and 8 prompts. The end-to-end call overlaps the host's
  work with the device's."""
  import jax
  from evf_jax import postprocess
  from evf_jax.beit3.preprocess import beit_image
  from evf_jax.sam import transforms as sam_transforms
  config, tokenizer = p.config, p.tokenizer
  s = config.sam.img_size
  p.set_image(image)
  img = p._image

  def host_prep():  # as set_image, with the postprocess matrices recomputed (a new image size)
    framed, input_hw = sam_transforms.to_frame(image, s)
    beit_image(image, config.beit3.img_size)
    postprocess.mask_postprocess_matrices.cache_clear()
    postprocess.mask_postprocess_matrices(input_hw, image.shape[:2], low_res=config.sam.low_res_size, img_size=s,
                                          pad_to=p.padded_hw(image.shape[:2]))
    return framed, input_hw
  framed, input_hw = host_prep()
  stages = {"host_prep": common.timed(host_prep, 5, warmup=1)[0]}
  hw = np.asarray([input_hw], np.int32)
  stages["embed"] = sync_time(lambda: p._embed(p.params, framed[None], hw))
  for n in (1, 8):
    ids, mask = tokenizer.encode_batch(common.PROMPTS[:n])
    stages[f"decode_{n}"] = sync_time(lambda: p._decode(p.params, img["embedding"], img["beit"], ids, mask))
    low, _ = p._decode(p.params, img["embedding"], img["beit"], ids, mask)
    stages[f"upsample_{n}"] = sync_time(lambda: p._upsample(low, img["a_y"], img["a_x"]))
    logits = jax.block_until_ready(p._upsample(low, img["a_y"], img["a_x"]))
    stages[f"to_host_{n}"] = common.timed(lambda: np.asarray(logits), 5, warmup=1)[0]
  key = f"ours_{p.precision}_{p.model.attention}_stages"
  RESULTS[key] = {k: v * 1e3 for k, v in stages.items()}
  log(f"{key} [ms]: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in stages.items()))


def _compare_logits(prefix=""):
  """bf16 against our fp32 logits, and our fp32 against the reference's, from the runs that happened.
  prefix: of the result keys ("sam2_": EVF-SAM2 images, "sam2_video_": the tracker's frames)."""
  fp32 = RESULTS.get(f"_logits_{prefix}ours_fp32")
  if fp32 is None:
    return
  for key in [k for k in RESULTS if k.startswith(f"_logits_{prefix}ours_bf16")]:
    v = RESULTS[key]
    name = key[len("_logits_"):]
    err = float(np.abs(v - fp32).max())
    agree = float(((v > 0) == (fp32 > 0)).mean())
    RESULTS[name + "_vs_fp32"] = dict(max_abs_logit_err=err, mask_agreement=agree, logit_scale=float(np.abs(fp32).max()))
    log(f"{name} vs fp32: max |logit err| {err:.4f} (logit scale {float(np.abs(fp32).max()):.2f}), "
        f"mask agreement {100 * agree:.4f}%")
  ref = RESULTS.get(f"_logits_{prefix}reference_fp32")
  if ref is not None:
    RESULTS[f"{prefix}ours_fp32_vs_reference_fp32_gpu"] = err = float(np.abs(ref - fp32).max())
    log(f"{prefix}ours fp32 vs reference fp32 ({TORCH_DEVICE}): max |logit err| {err:.5f}")


compare_logits = section("compare")(_compare_logits)
compare_sam2_logits = section("sam2_compare")(_compare_logits)


@section("reference")
def bench_reference(config, model, tokenizer, image):
  from evf_testing import evf_reference as ref
  ids = [[tokenizer.encode(p)] for p in common.PROMPTS]
  m = model.to(TORCH_DEVICE)
  # EVF-SAM's inference(): everything, image encoder included, per prompt.
  _time_reference("reference", lambda i, dtype: _ref_predict_cuda(ref, m, config, image, ids[i], dtype))


def _time_reference(key: str, predict_one) -> None:
  """Times a PyTorch reference's `predict_one(prompt index, dtype)` for 1 and 8 prompts, in fp32 and in bf16 (as
  EVF-SAM's inference does half precision: autocast over fp32 weights); keeps the fp32 logits of 8 prompts."""
  import torch
  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    def run(n):
      with torch.no_grad(), torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=dtype != torch.float32):
        outs = [predict_one(i, dtype) for i in range(n)]
      if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()
      return outs
    run(1)
    t1, _ = common.timed(lambda: run(1), 3, warmup=1)
    t8, _ = common.timed(lambda: run(8), 3)
    RESULTS[f"{key}_{name}"] = dict(one_prompt=t1, eight_prompts=t8)
    log(f"{key.replace('_', ' ')} {name}: 1 prompt {t1 * 1e3:.1f} ms, 8 prompts {t8 * 1e3:.1f} ms")
    if name == "fp32":
      RESULTS[f"_logits_{key}_fp32"] = np.stack(run(8))


def _ref_predict_cuda(ref, model, config, image, ids, dtype):  # dtype: under autocast
  import torch
  x, input_hw = ref.sam_input(image, config.sam.img_size, config.sam.pixel_mean, config.sam.pixel_std)
  sam = model.visual_model
  emb = sam.image_encoder(x.to(TORCH_DEVICE))
  t = torch.as_tensor(np.asarray(ids), device=TORCH_DEVICE)
  beit = ref.beit_input(image, config.beit3.img_size).to(TORCH_DEVICE)
  out = model.mm_extractor.beit3(visual_tokens=beit, textual_tokens=t, text_padding_position=t == 1)
  feat = model.text_hidden_fcs[0](out["encoder_out"][:, :1])
  pe = sam.prompt_encoder
  e = pe.image_embedding_size
  dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, e[0], e[1])
  low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=feat,
                            dense_prompt_embeddings=dense, multimask_output=False)
  masks = sam.postprocess_masks(low.float(), input_size=input_hw, original_size=image.shape[:2])
  return masks[0, 0].float().cpu().numpy()


@section("sam2_reference")
def bench_sam2_reference(config, model, tokenizer, image):
  """EVF-SAM2's PyTorch reference as its inference() runs it: per prompt, the uint8 squash to 1024, SAM-2's
  image encoder, BEiT-3, the decoder (multimask, best by IoU), bilinear to the original size."""
  from evf_testing.evf_reference import beit_input
  from evf_testing.sam2_reference import reference_evf_sam2, sam2_input
  s = config.sam2
  ids = [np.asarray([tokenizer.encode(p)]) for p in common.PROMPTS]
  m = model.to(TORCH_DEVICE)

  def predict_one(i, dtype):
    sam_x = sam2_input(image, s.image_size, s.pixel_mean, s.pixel_std).to(TORCH_DEVICE)
    beit_x = beit_input(image, config.beit3.img_size).to(TORCH_DEVICE)
    return reference_evf_sam2(m, sam_x, beit_x, ids[i], image.shape[:2])[0][0]
  _time_reference("sam2_reference", predict_one)


@section("sam2_video")
def bench_sam2_video(config, params, torch_sam, runs, frames, hw, chunk, skip_reference):
  """SAM-2 video tracking (EVF-SAM2's flow after the text prompt: frame 0 prompted by one sparse embedding, then
  memory attention / heads / memory encoder per frame, hole filling), from a JPEG folder to logits at the original
  size: ours (`tracking.VideoTracker`) for each (precision, attention) in `runs`, and sam2's legacy video
  predictor with EVF-SAM2's overrides and the same SAM-2 weights (fp32, and bf16 under autocast). Frames/s of a
  whole video after a first (compiling / warm-up) run; the reference's hole filling uses scipy in place of its
  CUDA kernel, as ours does."""
  import torch
  from benchmarks import video_cpu
  from evf_jax.evf import cast_kernels
  from evf_jax.runtime import compute_dtype
  from evf_jax.sam2 import tracking
  from evf_testing.sam2_reference import build_torch_video_predictor, connected_components_scipy, write_video_frames
  cfg = config.sam2
  prompt = np.random.default_rng(0).normal(size=(1, cfg.d_model)).astype(np.float32)
  d = tempfile.mkdtemp(prefix="sam2_video_")
  paths = write_video_frames(d, frames, *hw)
  RESULTS["sam2_video_setup"] = dict(frames=frames, hw=list(hw), chunk=chunk)
  for precision, impl in runs:
    key = f"sam2_video_ours_{precision}" + ("" if impl == "xla" else f"_{impl}")
    try:
      dtype = compute_dtype(precision, impl)
      tracker = tracking.VideoTracker(cfg, cast_kernels(params["sam"], dtype), dtype=dtype, attention=impl,
                                      chunk=chunk)
      t0 = time.perf_counter()
      video_cpu.run_ours(tracker, paths, prompt, hw)
      first = time.perf_counter() - t0
      t, _ = common.timed(lambda: video_cpu.run_ours(tracker, paths, prompt, hw), 2)
      RESULTS["_logits_" + key] = np.stack(video_cpu.run_ours(tracker, paths, prompt, hw))
    except Exception as e:
      RESULTS[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(f"{key} failed: {RESULTS[key + '_error']}")
      continue
    RESULTS[key] = dict(first_run=first, seconds_per_frame=t / frames, frames_per_s=frames / t)
    log(f"{key}: first run {first:.1f} s, {t / frames * 1e3:.1f} ms/frame, {frames / t:.2f} frames/s")
  if skip_reference:
    return
  vp = build_torch_video_predictor(cfg, seed=None)
  vp.load_state_dict(torch_sam.state_dict())  # the same SAM-2 weights as ours
  vp = vp.to(TORCH_DEVICE)
  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    def run():
      with torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=dtype != torch.float32):
        logits = video_cpu.run_reference(vp, d, prompt, components=connected_components_scipy)
      if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()
      return logits
    logits = run()
    t, _ = common.timed(run, 2)
    RESULTS[f"sam2_video_reference_{name}"] = dict(seconds_per_frame=t / frames, frames_per_s=frames / t)
    log(f"sam2 video reference {name}: {t / frames * 1e3:.1f} ms/frame, {frames / t:.2f} frames/s")
    if name == "fp32":
      RESULTS["_logits_sam2_video_reference_fp32"] = np.stack(logits)


def run_sam2(args, e2e_impls, tokenizer, image):
  """EVF-SAM2's rows: the image end to end (ours bf16 per attention, the reference fp32 and bf16, ours fp32),
  then video tracking (ours bf16 with the last of `e2e_impls` and fp32; the reference fp32 and bf16)."""
  import jax
  from convert.evf_sam2 import convert_evf_sam2
  from evf_jax.evf_sam2 import EvfSam2Config
  from evf_testing import torch_reference as tr
  from evf_testing.sam2_reference import build_torch_evf_sam2
  t0 = time.perf_counter()
  config = EvfSam2Config.preset(args.sam2_size)
  model = build_torch_evf_sam2(config, 0)
  params = jax.device_put(convert_evf_sam2(tr.state_dict_numpy(model), config).params)
  RESULTS["sam2_size"] = args.sam2_size
  log(f"built and converted EVF-SAM2 {args.sam2_size} in {time.perf_counter() - t0:.1f} s")
  bench_sam2_ours(config, params, tokenizer, image, [("bf16", impl) for impl in e2e_impls], prefix="sam2_")
  if not args.skip_reference:
    bench_sam2_reference(config, model, tokenizer, image)
  bench_sam2_ours(config, params, tokenizer, image, [("fp32", "xla")], prefix="sam2_")
  compare_sam2_logits("sam2_")
  runs = ([("bf16", e2e_impls[-1])] if e2e_impls else []) + [("fp32", "xla")]
  bench_sam2_video(config, params, model.visual_model, runs, args.video_frames, tuple(args.video_hw),
                   args.video_chunk, args.skip_reference)
  compare_sam2_logits("sam2_video_")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="evf-sam", choices=["tiny", "base", "evf-sam"])
  ap.add_argument("--batch-sizes", default="1,4,8")
  ap.add_argument("--out", default=None)
  ap.add_argument("--skip-reference", action="store_true")
  ap.add_argument("--e2e-attention", default="xla,cudnn",
                  help="attention for our bf16 end-to-end rows: xla, cudnn, or both (XLA's costs ~2 min)")
  ap.add_argument("--gelu-forms", default="",
                  help=f"extra encoder runs at the largest batch with other GELU code: {sorted(GELU_FORMS)} or ''")
  ap.add_argument("--family", default="evf-sam", choices=["evf-sam", "evf-sam2", "both"],
                  help="EVF-SAM's rows (--size), EVF-SAM2's (--sam2-size: image end to end and video), or both")
  ap.add_argument("--sam2-size", default="evf-sam2", choices=["toy", "evf-sam2"])
  ap.add_argument("--video-frames", type=int, default=8)
  ap.add_argument("--video-hw", type=int, nargs=2, default=(480, 640))
  ap.add_argument("--video-chunk", type=int, default=4)
  args = ap.parse_args()
  global OUT_PATH
  OUT_PATH = args.out
  forms = [f for f in args.gelu_forms.split(",") if f]
  e2e_impls = [a for a in args.e2e_attention.split(",") if a]
  if any(a not in ("xla", "cudnn") for a in e2e_impls):
    ap.error("--e2e-attention: expected a comma-separated subset of xla, cudnn")
  if any(f not in GELU_FORMS for f in forms):
    ap.error(f"--gelu-forms: expected names from {sorted(GELU_FORMS)}")
  import jax
  import torch
  from convert.evf import convert_evf
  from evf_jax.evf import EvfConfig
  from evf_jax.tokenizer import TextTokenizer
  from evf_testing import evf_reference as ref
  from evf_testing import torch_reference as tr

  global TORCH_DEVICE
  TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  peak = (model_flops.peak_flops(kind) or float("nan")) / 1e12  # TFLOP/s
  RESULTS.update(device=kind, jax=jax.__version__, torch=torch.__version__, size=args.size,
                 date=time.strftime("%Y-%m-%d"))
  log(f"device {kind}, jax {jax.__version__}, torch {torch.__version__}")
  tokenizer = TextTokenizer(common.train_spm(tempfile.mkdtemp()))
  image = common.test_image()
  if args.family in ("evf-sam", "both"):
    t0 = time.perf_counter()
    config = EvfConfig.preset(args.size)
    model = ref.build_torch_evf(config, 0)
    params = convert_evf(tr.state_dict_numpy(model), config).params
    params = jax.device_put(params)
    log(f"built and converted {args.size} in {time.perf_counter() - t0:.1f} s")
    bench_encoder(config, params, [int(b) for b in args.batch_sizes.split(",")], peak, forms)
    # fp32 last: its compile is the slowest, and a run cut at its time limit should still have the reference.
    predictors = bench_ours(config, params, tokenizer, image, [("bf16", impl) for impl in e2e_impls]) or {}
    if predictors:  # the cuDNN one when it ran
      bench_stages(predictors.get(("bf16", "cudnn")) or next(iter(predictors.values())), image)
    del predictors
    if not args.skip_reference:
      bench_reference(config, model, tokenizer, image)
    bench_ours(config, params, tokenizer, image, [("fp32", "xla")])
    compare_logits()
    del model, params
  if args.family in ("evf-sam2", "both"):
    run_sam2(args, e2e_impls, tokenizer, image)
  text = json.dumps({k: v for k, v in RESULTS.items() if not k.startswith("_")}, indent=2, default=float)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
