"""The evaluation step compiled for a TPU slice or a set of GPUs, on a machine without them.

    bash scripts/setup_static_env.sh tpu      # once: .venv-tpu-static, the requirements plus libtpu (~1.5 GB)
    .venv-tpu-static/bin/python -m benchmarks.eval_compile [--size evf-sam] [--topology v5e:2x2] [--precision bf16]
    bash scripts/setup_static_env.sh gpu      # once: .venv-gpu-static, jax's CUDA plugin (~6 GB)
    .venv-gpu-static/bin/python -m benchmarks.eval_compile --platform gpu [--topology 1x1x4] [--attention cudnn]

libtpu, and jax's CUDA plugin, compile for a topology without its chips (the way large jobs are compiled ahead
of time), so this builds `evaluate.sharded_step`, the step `run.py eval` runs, over a mesh of the topology's
devices and says whether it lowers there, what each device holds (XLA's memory analysis: arguments, i.e. the
replicated weights and the device's share of the batch, and temporaries) and whether the program
communicates between devices (it should not: evaluation is pure data parallelism). Nothing runs: no timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import deviceless  # imports no jax: main() sets the environment first

DEFAULT_TOPOLOGY = {"tpu": "v5e:2x2", "gpu": "1x1x4"}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--platform", default="tpu", choices=sorted(DEFAULT_TOPOLOGY))
  ap.add_argument("--topology", help="tpu: a topology libtpu knows, e.g. v5e:2x2 (default), v5p:2x2x1, v6e:2x2; "
                                     "gpu: hosts x 1 x GPUs per host, e.g. 1x1x4 (default)")
  ap.add_argument("--target", default="h100", choices=sorted(deviceless.TARGETS), help="gpu: the chip")
  ap.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="gpu: SAM's and BEiT-3's "
                  "attention (as `run.py eval --attention`; on TPU it is XLA's)")
  ap.add_argument("--size", default="evf-sam", help="model preset (default evf-sam: SAM ViT-H + BEiT-3-L)")
  ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
  ap.add_argument("--images-per-device", type=int, default=1)
  ap.add_argument("--prompts", type=int, default=2, help="prompts per image (a power of two, as batched)")
  ap.add_argument("--text-len", type=int, default=16, help="tokens per prompt (a text bucket)")
  ap.add_argument("--mask-size", type=int, default=640, help="original image sizes padded to this")
  ap.add_argument("--json", help="write the summary here (not overwritten)")
  args = ap.parse_args(argv)
  if args.json and os.path.exists(args.json):
    ap.error(f"{args.json} exists; not overwriting it")
  if args.platform == "tpu" and args.attention != "xla":
    ap.error("--attention cudnn is for --platform gpu")
  if args.attention == "cudnn" and args.precision == "fp32":
    ap.error("--attention cudnn needs --precision bf16")
  topology = args.topology or DEFAULT_TOPOLOGY[args.platform]
  if args.platform == "tpu":
    error = deviceless.use_compile_only_tpu("benchmarks.eval_compile")
  else:  # Triton GEMMs off, as in experimental/gpu_static.py: with no device to autotune on, some have no valid tiling
    error = deviceless.use_compile_only_cuda("--xla_gpu_enable_triton_gemm=false", "benchmarks.eval_compile")
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from evf_jax import evaluate
  from evf_jax.evf import EvfConfig, abstract_params, cast_kernels
  from evf_jax.predictor import compute_dtype

  try:
    devices = (deviceless.tpu_devices(topology) if args.platform == "tpu"
               else deviceless.cuda_devices(args.target, topology))
  except Exception as e:  # the compiler plugin's message for a topology it does not know
    print(f"error: {args.platform} topology {topology!r}: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  mesh = evaluate.make_mesh(devices)
  cfg = EvfConfig.preset(args.size)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  # Kernels stored in the compute dtype, as `evaluate_checkpoint` does.
  params = jax.eval_shape(lambda p: cast_kernels(p, compute_dtype(args.precision, args.attention)),
                          abstract_params(cfg))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  batch = evaluate.batch_spec(args.images_per_device * len(devices), args.prompts, args.text_len,
                              args.mask_size, sam_size=cfg.sam.img_size, beit_size=cfg.beit3.img_size,
                              low_res=cfg.sam.low_res_size, sharding=data)
  step = evaluate.sharded_step(evaluate.evf_predict_fn(cfg, args.precision, args.attention), mesh,
                               with_predictions=False)
  start = time.perf_counter()
  compiled = step.trace(params, batch).lower().compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  summary = {
      "settings": dict({k: v for k, v in vars(args).items() if k != "json"}, topology=topology),
      "devices": len(devices), "device_kind": devices[0].device_kind, "compile_s": round(seconds, 1),
      "per_device_gb": {name: getattr(memory, f"{name}_size_in_bytes") / 1e9
                        for name in ("argument", "output", "temp", "generated_code")},
      "collectives": deviceless.collectives(compiled.as_text()),
  }
  gb = summary["per_device_gb"]
  print(f"EVF-SAM ({args.size}, {args.precision}, attention {args.attention}) evaluation step for "
        f"{args.platform} {topology} ({len(devices)} x {summary['device_kind']}), {args.images_per_device} "
        f"image(s) x {args.prompts} prompts per device: compiled in {seconds:.1f} s")
  print(f"  per device: arguments {gb['argument']:.2f} GB, temporaries {gb['temp']:.2f} GB, "
        f"outputs {gb['output']:.3f} GB")
  print(f"  cross-device operations: {summary['collectives'] or 'none'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
