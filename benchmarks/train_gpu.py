"""Training-step benchmark for a GPU session (H100 / H200; minutes): bf16 compute with float32 parameters and
optimizer state, EVF-SAM's frozen set (SAM's image encoder forward only), at base size and full size.

    python -m benchmarks.train_gpu --out train_gpu.json [--size full,base] [--attention xla|cudnn] [--time-limit 450]
        [--profile 2]
    python -m benchmarks.train_gpu --size tiny --devices 1 --steps 2     # CPU, for tests

Per size (base: SAM ViT-B + BEiT-3-base; full: SAM ViT-H + BEiT-3-large, `EvfConfig.preset("evf-sam")`, with
remat by default), the step the trainer runs (`make_train_step`, jitted with the state's shardings and the state
donated, on a data-parallel mesh over --devices) on a random batch already on the device (data-free):
  setup    parameters (random init; the values do not change the timings), the state, the batch;
  compile  trace + lower and XLA compile times, XLA's memory plan (arguments, outputs, temporaries) and FLOPs;
  steps    --warmup untimed steps, then --steps timed steps each waited for (median) and the same number issued
           back to back with one wait (pipelined), images/s, MFU from `evf_jax.flops.train_step` over
           `evf_jax.flops.peak_flops(device_kind)` (dense bf16 peak), peak device memory
           (`memory_stats()["peak_bytes_in_use"]`, where the backend reports it), the first and last loss;
  profile  with --profile N: N more steps under `jax.profiler`, their device time per part of the model (SAM's
           encoder, BEiT-3, projector, decoder, upsampling, loss, optimizer) and per pass (forward, backward with
           any recomputation, outside the gradient), and the costliest HLO ops (`evf_testing.profiling`). Each
           op is matched to its instruction, which a GPU's kernels name only outside command buffers, so
           --profile runs the whole size without them (`--xla_gpu_enable_command_buffer=`, recorded as
           "xla_flags"): its step times are those of that setting.

Each size runs in its own child process (its peak memory is its own; a crash or an out-of-memory in one size
does not lose the other). Every section catches its exception and records it as "<section>_error"; the --out
JSON is rewritten after every section, so a run stopped at its time limit keeps what it measured. With
--time-limit, timed steps stop when the limit is near (the median of those done is kept, with their count) and
a size is skipped when too little time is left to compile it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # nothing else on the device

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"tiny": "tiny", "base": "base", "full": "evf-sam"}
SECTIONS = ("setup", "compile", "steps", "profile")
RESULTS: dict = {}
OUT_PATH = None
T_START = time.time()


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_out(label: str | None = None) -> None:
  """RESULTS -> --out; a child merges its size into what the file already holds (the parent's keys)."""
  if not OUT_PATH:
    return
  data = RESULTS
  if label is not None:
    try:
      with open(OUT_PATH) as f:
        data = json.load(f)
    except (OSError, ValueError):
      data = {}
    data[label] = RESULTS.get(label, {})
  tmp = OUT_PATH + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, default=float)
  os.replace(tmp, OUT_PATH)


def run_section(label: str, name: str, fn, *a):
  """fn(*a) -> dict stored as RESULTS[label][name]; an exception is stored as RESULTS[label][name + "_error"]."""
  t0 = time.perf_counter()
  out = RESULTS.setdefault(label, {})
  value = None
  try:
    value = fn(*a)
    out[name] = value if isinstance(value, dict) else {}
  except Exception as e:  # keep going: one failing section must not lose the others
    out[name + "_error"] = f"{type(e).__name__}: {str(e)[:800]}"
    log(f"{label} {name} FAILED: {out[name + '_error']}")
    traceback.print_exc()
    value = None
  out.setdefault("section_s", {})[name] = time.perf_counter() - t0
  log(f"{label} {name} took {time.perf_counter() - t0:.1f} s")
  write_out(label)
  return value


def time_left(args) -> float:
  return float("inf") if not args.time_limit else args.time_limit - (time.time() - T_START)


# ---------------------------------------------------------------- one size (child)


class Ctx:
  pass


def setup(ctx: Ctx, label: str, args) -> dict:
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from evf_jax import flops as flops_lib
  from evf_jax import sharding
  from evf_jax.evf import EvfConfig, EvfSam
  from evf_jax.runtime import check_attention_platform, compute_dtype
  from evf_jax.train import config as train_config
  from evf_jax.train import optimizer, partition
  from evf_jax.train.step import StepOptions, make_train_step
  from evf_jax.train.trainer import fresh_state, state_layout
  from evf_testing.training import random_batch, random_params
  t0 = time.perf_counter()
  check_attention_platform(args.attention)
  dtype = compute_dtype(args.precision, args.attention)
  config = EvfConfig.preset(PRESETS[label])
  remat = label in args.remat
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  per_device = getattr(args, f"batch_{label}")
  images = per_device * len(devices)
  mesh = sharding.make_mesh([("data", -1)], devices)
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  trainable = train_config.EVF_SAM_TRAINABLE
  schedule = optimizer.learning_rate(1e-4, total_steps=1_000_000, warmup_steps=0, schedule="constant")
  tx = optimizer.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=1.0)
  shapes, shards, _ = state_layout(config, trainable, tx, mesh, rules)
  state = fresh_state(random_params(partition.merge(shapes["params"], shapes["frozen"])), trainable, tx, shards)
  replicated = NamedSharding(mesh, P())
  encoder_frozen = partition.encoder_frozen(shapes["params"])
  options = StepOptions(dtype=dtype, encoder_frozen=encoder_frozen)
  model = EvfSam(config, attention=args.attention, remat=remat, dtype=dtype)
  fn = make_train_step(model, config, tx, schedule, options)
  batch_sh = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    step = jax.jit(fn, in_shardings=(shards, batch_sh), out_shardings=(shards, replicated), donate_argnums=0)
  host = random_batch(config, images=images, prompts=args.prompts, text_len=args.text_len,
                      mask_size=args.mask_size, seed=0, invalid=0)
  batch = jax.block_until_ready(sharding.global_batch(host, batch_sh))
  del host
  flops = flops_lib.train_step(config, images=images, prompts_per_image=args.prompts, text_len=args.text_len,
                               encoder_frozen=encoder_frozen)
  dev = devices[0]
  kind = getattr(dev, "device_kind", str(dev))
  ctx.__dict__.update(config=config, mesh=mesh, rules=rules, state=state, step=step, batch=batch, images=images,
                      flops=flops, peak=flops_lib.peak_flops(kind), n_devices=len(devices), dev=dev)
  n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["frozen"]))
  return dict(preset=PRESETS[label], remat=remat, precision=args.precision, attention=args.attention,
              devices=len(devices), device_kind=kind, images_per_device=per_device, images=images,
              prompts_per_image=args.prompts, text_len=args.text_len,
              mask_size=args.mask_size or config.sam.img_size, trained_params=n_trained, frozen_params=n_frozen,
              model_flops_per_step=flops, peak_flops_per_device=ctx.peak, seconds=time.perf_counter() - t0,
              memory=memory_stats(dev), device=device_info())


def device_info() -> dict:
  import jax
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": getattr(dev, "device_kind", str(dev)),
          "device_count": jax.device_count()}


def memory_stats(dev) -> dict | None:
  try:
    m = dev.memory_stats()
  except Exception:
    return None
  if not m:
    return None
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {k: int(m[k]) for k in keep if k in m}


def compile_step(ctx: Ctx, label: str, args) -> dict:
  from evf_jax import sharding
  with sharding.activate(ctx.mesh, ctx.rules):
    t0 = time.perf_counter()
    lowered = ctx.step.lower(ctx.state, ctx.batch)
    trace_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx.compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  out = dict(trace_lower_s=trace_lower, compile_s=compile_s)
  try:
    m = ctx.compiled.memory_analysis()
    out["memory_analysis"] = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                  "temp_size_in_bytes", "alias_size_in_bytes",
                                                                  "generated_code_size_in_bytes") if hasattr(m, k)}
  except Exception as e:  # not every backend reports it
    out["memory_analysis"] = f"unavailable: {type(e).__name__}"
  try:
    cost = ctx.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["xla_flops"] = float(cost.get("flops", float("nan")))
  except Exception:
    out["xla_flops"] = None
  log(f"{label}: trace/lower {trace_lower:.1f} s, compile {compile_s:.1f} s; {out['memory_analysis']}")
  return out


def run_steps(ctx: Ctx, label: str, args) -> dict:
  import jax
  from evf_jax import sharding
  compiled, batch = ctx.compiled, ctx.batch
  state = ctx.state
  losses = []
  with sharding.activate(ctx.mesh, ctx.rules):
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))  # waits for the step
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      if times and time_left(args) < args.margin + 2 * max(times):
        log(f"{label}: time limit near; stopping after {len(times)} timed steps")
        break
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
    pipelined = None
    if len(times) == args.steps and time_left(args) > args.margin + 2 * args.steps * statistics.median(times):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = compiled(state, batch)  # dispatched back to back; one wait at the end
      jax.block_until_ready((state, metrics))
      pipelined = (time.perf_counter() - t0) / args.steps
      losses.append(float(metrics["loss"]))
  ctx.state = state
  step_s = statistics.median(times) if times else float("nan")
  best = min(step_s, pipelined or step_s)
  mfu = ctx.flops / best / (ctx.n_devices * ctx.peak) if ctx.peak else None
  out = dict(step_s=step_s, step_all=times, steps_timed=len(times), pipelined_step_s=pipelined, warmup_s=warm,
             images_per_s=ctx.images / best, prompts_per_s=ctx.images * args.prompts / best,
             model_tflops_per_s=ctx.flops / best / 1e12, mfu=mfu, loss_first=losses[0] if losses else None,
             loss_last=losses[-1] if losses else None, losses_finite=bool(np.all(np.isfinite(losses))),
             memory=memory_stats(ctx.dev))
  log(f"{label}: step {step_s * 1e3:.1f} ms (pipelined {pipelined * 1e3 if pipelined else float('nan'):.1f} ms), "
      f"{out['images_per_s']:.1f} img/s, {out['model_tflops_per_s']:.1f} TFLOP/s"
      + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
      + (f", peak memory {out['memory']['peak_bytes_in_use'] / 2**30:.2f} GiB"
         if out["memory"] and "peak_bytes_in_use" in out["memory"] else ""))
  return out


def step_part(op_name: str) -> str:
  """The part of the training step an HLO op's name stack belongs to."""
  for key, part in (("EvfSam.embed_image", "SAM image encoder"), ("/beit3/", "BEiT-3"), ("/projector/", "projector"),
                    ("EvfSam.decode", "SAM prompt encoder + mask decoder"), ("hk,nkl,wl->nhw", "upsampling to the loss size")):
    if key in op_name:
      return part
  return "loss" if "jvp(" in op_name else "optimizer update and norms"


def profile_steps(ctx: Ctx, label: str, args) -> dict:
  import jax
  from evf_jax import sharding
  from evf_testing import profiling
  trace_dir = tempfile.mkdtemp(prefix="train_gpu_trace_")
  state = ctx.state
  with sharding.activate(ctx.mesh, ctx.rules):
    with jax.profiler.trace(trace_dir):
      t0 = time.perf_counter()  # the steps only: not the profiler's start, nor its stop (which writes the trace)
      for _ in range(args.profile):
        state, metrics = ctx.compiled(state, ctx.batch)
      jax.block_until_ready((state, metrics))
      wall = (time.perf_counter() - t0) / args.profile
  ctx.state = state
  text = ctx.compiled.as_text()
  path = profiling.trace_file(trace_dir)
  events = profiling.load_trace(path)
  names = profiling.op_names(text)
  times = profiling.op_times(events, profiling.module_name(text), instructions=profiling.instructions(text))
  out = profiling.attribute(times, names, step_part, per=args.profile)
  if not times:  # say what the trace held instead
    out["modules_in_trace"] = sorted({str((e.get("args") or {}).get("hlo_module")) for e in events
                                      if "hlo_module" in (e.get("args") or {})})
  out.update(steps=args.profile, traced_wall_ms_per_step=wall * 1e3, xla_flags=os.environ.get("XLA_FLAGS", ""))
  if OUT_PATH:
    if os.path.getsize(path) <= args.keep_trace_mib << 20:
      kept = f"{os.path.splitext(os.path.abspath(OUT_PATH))[0]}_{label}.trace.json.gz"  # r.json -> r_full.trace...
      shutil.copy(path, kept)
      out["trace"] = os.path.basename(kept)
  shutil.rmtree(trace_dir, ignore_errors=True)
  log(f"{label}: device time {out['device_ms']:.1f} ms per step (traced wall {wall * 1e3:.1f} ms); "
      + ", ".join(f"{k} {v:.1f} ms" for k, v in out["passes_ms"].items()))
  for row in out["parts"]:
    log(f"  {row['ms']:8.2f} ms  {100 * row['share']:5.1f}%  {row['part']} ({row['pass']})")
  for row in out["top_ops"][:15]:
    log(f"    {row['ms']:7.2f} ms  {row['op']}  {row['op_name'][-90:]}")
  return out


def run_size(label: str, args) -> None:
  ctx = Ctx()
  if run_section(label, "setup", setup, ctx, label, args) is None:
    return
  if run_section(label, "compile", compile_step, ctx, label, args) is None:
    return
  run_section(label, "steps", run_steps, ctx, label, args)
  if args.profile and time_left(args) > args.margin + 10:
    run_section(label, "profile", profile_steps, ctx, label, args)


# ---------------------------------------------------------------- parent


def sizes_xla_flags(args) -> str:
  """XLA_FLAGS for the sizes: the environment's, without command buffers under --profile."""
  from evf_testing.profiling import NO_COMMAND_BUFFERS
  flags = os.environ.get("XLA_FLAGS", "")
  if args.profile and NO_COMMAND_BUFFERS.split("=")[0] not in flags:
    flags = f"{flags} {NO_COMMAND_BUFFERS}".strip()
  return flags


def child(label: str, args) -> None:
  """One size in a child process that writes its sections into --out itself."""
  cmd = [sys.executable, "-m", "benchmarks.train_gpu", "--role", "child", "--size", label,
         "--time-limit", repr(time_left(args)) if args.time_limit else "0", *args.passthrough]
  env = dict(os.environ, XLA_FLAGS=args.xla_flags)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
  sys.stderr.write(r.stderr[-20000:])
  try:
    with open(OUT_PATH) as f:
      RESULTS[label] = json.load(f).get(label, {})
  except (OSError, ValueError):
    RESULTS.setdefault(label, {})
  RESULTS[label]["process_s"] = time.perf_counter() - t0
  if r.returncode:
    RESULTS[label]["process_error"] = f"exit status {r.returncode}: {r.stderr[-1500:]}"
    log(f"{label}: child process failed ({r.returncode})")
  write_out()


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="full,base",
                  help="comma-separated, run in this order: tiny, base, full (default: full first, the size to plan for)")
  ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
  ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype")
  ap.add_argument("--batch-tiny", type=int, default=2, help="images per device at tiny size")
  ap.add_argument("--batch-base", type=int, default=16, help="images per device at base size")
  ap.add_argument("--batch-full", type=int, default=8, help="images per device at full size")
  ap.add_argument("--prompts", type=int, default=3, help="prompts per image")
  ap.add_argument("--text-len", type=int, default=64, help="tokens per prompt (data.max_text_len)")
  ap.add_argument("--mask-size", type=int, default=0, help="loss resolution (0: SAM's input size, the default)")
  ap.add_argument("--remat", default="full",
                  help="comma-separated sizes that recompute activations (none: no size)")
  ap.add_argument("--devices", type=int, default=0, help="devices of the data-parallel mesh (0: all)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  ap.add_argument("--time-limit", type=float, default=0, help="seconds for the whole run (0: none)")
  ap.add_argument("--margin", type=float, default=20, help="seconds kept back from --time-limit")
  ap.add_argument("--compile-cache", default="",
                  help="jax's persistent compilation cache directory (a rerun on the same machine skips compiling; "
                       "its compile times are then cache reads)")
  ap.add_argument("--profile", type=int, default=0,
                  help="steps to trace after the timed ones and attribute per model part (0: none); runs the size "
                       "without GPU command buffers")
  ap.add_argument("--keep-trace-mib", type=int, default=15,
                  help="with --out, keep a profile's trace.json.gz beside it when at most this size")
  ap.add_argument("--in-process", action="store_true", help="run every size in this process (no children)")
  ap.add_argument("--out", default=None, help="JSON results, rewritten after every section")
  ap.add_argument("--role", default="parent", choices=["parent", "child"])
  args = ap.parse_args(argv)
  sizes = [s for s in args.size.split(",") if s]
  if any(s not in PRESETS for s in sizes):
    ap.error(f"--size: expected a comma-separated subset of {sorted(PRESETS)}")
  args.remat = [s for s in args.remat.split(",") if s and s != "none"]
  if any(s not in PRESETS for s in args.remat):  # a misspelt size would silently run without remat
    ap.error(f"--remat: expected none or a comma-separated subset of {sorted(PRESETS)}")
  global OUT_PATH, T_START
  OUT_PATH = args.out
  import jax
  if args.compile_cache:
    from evf_jax.runtime import enable_compilation_cache
    enable_compilation_cache(args.compile_cache)
  isolate = bool(OUT_PATH) and not args.in_process and args.role == "parent"
  args.xla_flags = sizes_xla_flags(args)
  if args.profile and not isolate:  # the sizes run here: before the backend starts (a started one keeps its flags)
    os.environ["XLA_FLAGS"] = args.xla_flags
  if args.role == "child":
    run_size(sizes[0], args)
    return
  T_START = time.time()
  RESULTS.update(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, sizes=sizes, attention=args.attention,
                 precision=args.precision, compile_cache=args.compile_cache or None,
                 time_limit=args.time_limit or None, xla_flags=args.xla_flags or None)
  if not isolate:  # with children, this process never starts a backend: it would hold device memory
    RESULTS.update(device_info())
  log(f"jax {jax.__version__}; sizes {sizes}, attention {args.attention}, {args.precision}"
      + ("" if isolate else f"; {RESULTS['device_kind']} x {RESULTS['device_count']}"))
  write_out()
  skip = ("--size", "--role", "--time-limit", "--in-process")
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough, i = [], 0
  while i < len(argv):  # the child gets every option but those it is given anew
    a = argv[i]
    if a.split("=")[0] in skip:
      i += 1 if ("=" in a or a == "--in-process") else 2
      continue
    passthrough.append(a)
    i += 1
  args.passthrough = passthrough
  for label in sizes:
    if time_left(args) < args.margin + 30:
      RESULTS[label] = {"skipped": f"{time_left(args):.0f} s left of --time-limit"}
      log(f"{label}: skipped ({RESULTS[label]['skipped']})")
      write_out()
      continue
    if not isolate:
      run_size(label, args)
      continue
    child(label, args)
    if "device_kind" not in RESULTS and "device" in RESULTS[label].get("setup", {}):
      RESULTS.update(RESULTS[label]["setup"]["device"])
      write_out()
  text = json.dumps(RESULTS, indent=2, default=float)
  print(text)
  write_out()


if __name__ == "__main__":
  main()
