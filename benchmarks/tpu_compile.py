"""The evaluation step compiled for a TPU slice, on a machine without a TPU.

    bash scripts/setup_tpu_static_env.sh      # once: .venv-tpu-static, the requirements plus libtpu (~1.5 GB)
    .venv-tpu-static/bin/python benchmarks/tpu_compile.py [--size evf-sam] [--topology v5e:2x2] [--precision bf16]

libtpu compiles for a TPU topology without the chips (the way large TPU jobs are compiled ahead of time), so
this builds `evaluate.sharded_step`, the step `run.py eval` runs, over a mesh of the topology's chips and
says whether it lowers for TPU, what each chip holds (XLA's memory analysis: arguments, i.e. the replicated
weights and the chip's share of the batch, and temporaries) and whether the program communicates between
chips (it should not: evaluation is pure data parallelism). Nothing runs, so there is no timing here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo_text: str) -> dict[str, int]:
  """How many of each cross-device operation a compiled program holds (async pairs count once)."""
  found = re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
  return {op: found.count(op) for op in COLLECTIVES if op in found}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="evf-sam", help="model preset (default evf-sam: SAM ViT-H + BEiT-3-L)")
  ap.add_argument("--topology", default="v5e:2x2", help="a TPU topology libtpu knows, e.g. v5e:2x2, v5p:2x2x1, "
                                                         "v4:2x2x1, v6e:2x2")
  ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
  ap.add_argument("--images-per-chip", type=int, default=1)
  ap.add_argument("--prompts", type=int, default=2, help="prompts per image (a power of two, as batched)")
  ap.add_argument("--text-len", type=int, default=16, help="tokens per prompt (a text bucket)")
  ap.add_argument("--mask-size", type=int, default=640, help="original image sizes padded to this")
  ap.add_argument("--json", help="write the summary here (not overwritten)")
  args = ap.parse_args(argv)
  if args.json and os.path.exists(args.json):
    ap.error(f"{args.json} exists; not overwriting it")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("error: benchmarks/tpu_compile.py needs libtpu: run scripts/setup_tpu_static_env.sh and use "
          ".venv-tpu-static/bin/python", file=sys.stderr)
    return 2
  os.environ["JAX_PLATFORMS"] = "cpu"  # jax runs on the CPU; libtpu only compiles
  # libtpu describes the local host from these at start-up and warns at length when they are missing; with
  # no chips here they change nothing else (the target is --topology).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  import jax
  from jax.experimental.topologies import get_topology_desc
  from jax.sharding import NamedSharding, PartitionSpec as P

  from evf_jax import evaluate
  from evf_jax.evf import EvfConfig, abstract_params, cast_kernels
  from evf_jax.predictor import compute_dtype

  try:
    devices = get_topology_desc(platform="tpu", topology_name=args.topology).devices
  except Exception as e:  # libtpu's message for a topology it does not know
    print(f"error: TPU topology {args.topology!r}: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  mesh = evaluate.make_mesh(devices)
  cfg = EvfConfig.preset(args.size)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  # Kernels stored in the compute dtype, as `evaluate_checkpoint` does.
  params = jax.eval_shape(lambda p: cast_kernels(p, compute_dtype(args.precision, None)), abstract_params(cfg))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  batch = evaluate.batch_spec(args.images_per_chip * len(devices), args.prompts, args.text_len, args.mask_size,
                              sam_size=cfg.sam.img_size, beit_size=cfg.beit3.img_size,
                              low_res=cfg.sam.low_res_size, sharding=data)
  step = evaluate.sharded_step(evaluate.evf_predict_fn(cfg, args.precision), mesh, with_predictions=False)
  start = time.perf_counter()
  compiled = step.trace(params, batch).lower().compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  summary = {
      "settings": {k: v for k, v in vars(args).items() if k != "json"},
      "chips": len(devices), "device_kind": devices[0].device_kind, "compile_s": round(seconds, 1),
      "per_chip_gb": {name: getattr(memory, f"{name}_size_in_bytes") / 1e9
                      for name in ("argument", "output", "temp", "generated_code")},
      "collectives": collectives(compiled.as_text()),
  }
  gb = summary["per_chip_gb"]
  print(f"EVF-SAM ({args.size}, {args.precision}) evaluation step for {args.topology} ({len(devices)} x "
        f"{summary['device_kind']}), {args.images_per_chip} image(s) x {args.prompts} prompts per chip: "
        f"compiled in {seconds:.1f} s")
  print(f"  per chip: arguments {gb['argument']:.2f} GB, temporaries {gb['temp']:.2f} GB, "
        f"outputs {gb['output']:.3f} GB")
  print(f"  cross-chip operations: {summary['collectives'] or 'none'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
