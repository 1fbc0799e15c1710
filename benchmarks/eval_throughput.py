#!/usr/bin/env python3
"""`run.py eval` throughput (sentences/s) on a RefCOCO-like split, random weights converted with our converter.

    python -m benchmarks.eval_throughput --device cpu --size base --images 4 --batch-size 2   # this CPU
    python -m benchmarks.eval_throughput --device gpu --size evf-sam --images 64 --batch-size 8 --precision bf16

The GPU line is the one-command GPU variant (same script; `--device gpu` just requires a GPU backend).
The data: 640x480 / 427x640 JPEGs with 3 refs x 2 sentences each (RefCOCO has ~7 sentences per image),
written in the raw refer layout and converted by the real `prepare` into a `val` split. The evaluator runs
the split twice with the same compiled steps: the first pass includes compilation, the second is steady
state. Numbers are for the machine it runs on; the weights are random, so the IoUs mean nothing.
Needs the dev requirements (torch, segment-anything, torchscale) to build the reference weights.
Results: docs/performance.md#evaluation-throughput-cpu.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--device", choices=["cpu", "gpu", "default"], default="default",
                  help="JAX platform (default: whatever JAX picks)")
  ap.add_argument("--size", default="base", choices=["tiny", "base", "evf-sam"], help="EVF-SAM preset")
  ap.add_argument("--images", type=int, default=4, help="images in the benchmark split")
  ap.add_argument("--batch-size", type=int, default=2, help="images per step")
  ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
  ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                  help="as `run.py eval --attention`: cudnn is flash attention on NVIDIA GPUs, bf16/fp16 only")
  ap.add_argument("--workdir", default=None, help="cache for the converted checkpoint (default: a temp dir)")
  args = ap.parse_args()
  if args.attention == "cudnn" and args.precision == "fp32":
    ap.error("--attention cudnn needs --precision bf16 or fp16")
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.device == "gpu":
    os.environ["JAX_PLATFORMS"] = "cuda"

  import jax

  from evf_testing import benchmarking as common
  from benchmarks.data_throughput import write_refcoco_like
  from data_pipelines import prepare
  from evf_jax import evaluate
  from evf_jax.predictor import load_checkpoint

  workdir = args.workdir or tempfile.mkdtemp(prefix="evf_eval_bench_")
  t0 = time.perf_counter()
  _, _, ckpt = common.build_models(args.size, workdir)
  print(f"checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)
  src, root = os.path.join(workdir, f"raw{args.images}"), os.path.join(workdir, f"data{args.images}")
  if not os.path.isdir(os.path.join(root, "refcoco")):
    write_refcoco_like(src, args.images)
    refs_path = os.path.join(src, "refcoco", "refs(unc).p")
    with open(refs_path, "rb") as f:
      refs = pickle.load(f)
    for r in refs:  # the helper writes a train split; evaluate the same images as "val"
      r["split"] = "val"
    with open(refs_path, "wb") as f:
      pickle.dump(refs, f, protocol=2)
    prepare.prepare("refcoco", os.path.join(root, "refcoco"), src, progress=False)

  config, params, tokenizer = load_checkpoint(ckpt)
  evaluator = evaluate.Evaluator(
      evaluate.evf_predict_fn(config, args.precision, args.attention), params, tokenizer,
      sam_size=config.sam.img_size, beit_size=config.beit3.img_size, low_res=config.sam.low_res_size,
      options=evaluate.EvalOptions(batch_size=args.batch_size, progress=False))
  runs = [evaluator.run(os.path.join(root, "refcoco"), "val", name="refcoco|unc|val") for _ in range(2)]
  assert runs[0]["total_union"] == runs[1]["total_union"]  # same compiled steps, same data: same numbers
  result = {"size": args.size, "precision": args.precision, "attention": args.attention,
            "device_kind": runs[1]["device_kind"], "devices": runs[1]["devices"], "batch_size": runs[1]["batch_size"], "images": runs[1]["images"],
            "sentences": runs[1]["sentences"], "first_pass_s": runs[0]["wall_time_s"],
            "steady_s": runs[1]["wall_time_s"], "sentences_per_s": runs[1]["sentences_per_s"],
            "images_per_s": runs[1]["images"] / runs[1]["wall_time_s"], "jax": jax.__version__}
  common.emit(result)
  print(f"{args.size} {args.precision} on {result['devices']}x {result['device_kind']}: "
        f"{result['sentences_per_s']:.2f} sentences/s, {result['images_per_s']:.3f} images/s steady "
        f"(first pass with compilation {result['first_pass_s']:.1f} s, steady {result['steady_s']:.1f} s, "
        f"{result['sentences']} sentences)")


if __name__ == "__main__":
  main()
