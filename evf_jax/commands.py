"""Sub-commands of `run.py`. Each is registered with `@cli.command` and imports its heavy modules lazily."""

from __future__ import annotations

import argparse
import os

from evf_jax.cli import command
from evf_jax.errors import UserError


def _add_attention_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                 help="attention kernels: auto (XLA's choice), xla, or cudnn (flash attention on NVIDIA GPUs; "
                      "needs --precision bf16 or fp16)")


def _attention_impl(args: argparse.Namespace):
  """--attention -> the models' attention_impl, checked against --precision and the platform before any
  checkpoint is read."""
  from evf_jax.predictor import compute_dtype
  impl = None if args.attention == "auto" else args.attention
  compute_dtype(args.precision, impl)
  if impl == "cudnn":
    import jax
    if jax.default_backend() != "gpu":
      raise UserError(f"--attention cudnn needs an NVIDIA GPU; jax is running on {jax.default_backend()}")
  return impl


def _convert_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--src", required=True,
                 help="a Hugging Face-style EVF-SAM directory (config.json + model.safetensors / sharded "
                      "safetensors / pytorch_model.bin + tokenizer files), or a hub id like YxZhang/evf-sam")
  p.add_argument("--out", required=True, help="the evf-jax checkpoint directory to write")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing evf-jax checkpoint at --out (other directories are never replaced)")


@command("convert", help="convert a PyTorch EVF-SAM checkpoint into an evf-jax checkpoint directory")
def convert_cmd(args: argparse.Namespace) -> int:
  from convert.evf import convert_directory
  convert_directory(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
  return 0


convert_cmd.add_arguments = _convert_args


def _predict_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="an evf-jax checkpoint directory (from `run.py convert`)")
  p.add_argument("--image", required=True, help="the image (JPEG, PNG, WebP, BMP, ...)")
  p.add_argument("--prompt", action="append", required=True,
                 help="a referring text; repeat for several (e.g. --prompt 'zebra top left' --prompt '[semantic] sky')")
  p.add_argument("--out-dir", required=True, help="where to write <stem>_<i>_mask.png and <stem>_<i>_vis.png")
  p.add_argument("--save-logits", action="store_true", help="also write <stem>_<i>_logits.npy (float32, H x W)")
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision")
  _add_attention_arg(p)
  p.add_argument("--max-text-length", type=int, default=None,
                 help="longest prompt in tokens (special tokens included); longer ones are truncated with a warning")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="persistent compilation cache directory (makes later runs start faster)")


@command("predict", help="segment an image by text prompts with a converted checkpoint")
def predict_cmd(args: argparse.Namespace) -> int:
  from evf_jax.images import load_image, save_prediction
  from evf_jax.predictor import Predictor
  prompts = list(args.prompt)
  for i, p in enumerate(prompts):
    if not p.strip():
      raise UserError(f"--prompt {i + 1} is empty or whitespace-only")
  attention_impl = _attention_impl(args)
  image = load_image(args.image)
  if os.path.isfile(args.out_dir):
    raise UserError(f"--out-dir {args.out_dir} is a file")
  predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, attention_impl=attention_impl,
                                        compilation_cache_dir=args.compilation_cache,
                                        max_text_length=args.max_text_length)
  predictor.set_image(image)
  result = predictor.predict(prompts)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(args.image))[0]
  for i, prompt in enumerate(prompts):
    mask = result.masks[i]
    save_prediction(os.path.join(args.out_dir, f"{stem}_{i}"), image, mask,
                    result.logits[i] if args.save_logits else None)
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    print(f"[{i}] {shown!r}: mask area {int(mask.sum())} px ({100.0 * mask.mean():.2f}%), "
          f"score {float(result.scores[i]):.4f}")
  return 0


predict_cmd.add_arguments = _predict_args


def _prepare_args(p):
  from data_pipelines.prepare import DATASETS
  p.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME",
                 help="one of: " + ", ".join(DATASETS))
  p.add_argument("--src", default=None, help="root of the raw download in the EVF-SAM layout (not for synthetic)")
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--records-per-shard", type=int, default=2000, help="images per ArrayRecord shard")
  p.add_argument("--num-train", type=int, default=2000, help="synthetic only: train images")
  p.add_argument("--num-eval", type=int, default=200, help="synthetic only: eval ('val') images")
  p.add_argument("--seed", type=int, default=0, help="synthetic only: generator seed")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def prepare_cmd(args) -> int:
  from data_pipelines import prepare
  summary = prepare.prepare(args.dataset, args.out, args.src, num_train=args.num_train, num_eval=args.num_eval,
                            seed=args.seed, records_per_shard=args.records_per_shard,
                            progress=not args.no_progress)
  splits = ", ".join(f"{k}: {v['images']} images / {v['prompts']} prompts" for k, v in summary["splits"].items())
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
  print(f"wrote {args.out} ({splits}); skipped: {skipped}")
  return 0


prepare_cmd.add_arguments = _prepare_args  # read by `command` at registration, so set before it
command("prepare", help="Convert a raw dataset download (or the synthetic set) into ArrayRecord shards.")(prepare_cmd)


def _eval_args(p: argparse.ArgumentParser) -> None:
  from evf_jax.evaluate import STANDARD_SPLITS
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = (
      "Splits are named as in EVF-SAM's eval.py, DATASET|SPLITBY|SPLIT (quote them in a shell):\n"
      "  the eight standard ones (--split standard selects all): " + ", ".join(STANDARD_SPLITS) + "\n"
      "  also: refclef|unc|{val,testA,testB,testC}, grefcoco|unc|{val,testA,testB}, synthetic|val\n"
      "Data: --data ROOT holds one prepared directory per dataset, named like the dataset:\n"
      "  python run.py prepare --dataset refcoco --src dataset/refer_seg --out ROOT/refcoco\n"
      "  python run.py prepare --dataset synthetic --out ROOT/synthetic\n"
      "so 'refcoco|unc|val' reads split 'val' of ROOT/refcoco. --data may also be one prepared directory.\n"
      "Output: OUT_DIR/<DATASET_SPLITBY_SPLIT>.json per split (gIoU/cIoU as fractions, counts, timing,\n"
      "devices, batch size, checkpoint provenance) and a table on stdout (IoUs in percent).")
  p.add_argument("--checkpoint", required=True, help="an evf-jax checkpoint directory (from `run.py convert`)")
  p.add_argument("--data", required=True, help="root of prepared datasets (see below)")
  p.add_argument("--split", action="append", required=True, metavar="SPLIT",
                 help="a split such as 'refcoco|unc|val', or 'standard'; repeat for several")
  p.add_argument("--out-dir", default="eval_results", help="where the JSON results go (default: eval_results)")
  p.add_argument("--batch-size", type=int, default=8,
                 help="images per step, all their sentences included; rounded up to a multiple of the device "
                      "count (every image is evaluated exactly once whatever the value)")
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                 help="compute precision (the reference evaluates in fp16 by default)")
  _add_attention_arg(p)
  p.add_argument("--size-multiple", type=int, default=128,
                 help="original image sizes are padded up to a multiple of this (fewer compiled shapes)")
  p.add_argument("--num-devices", type=int, default=None, help="use only the first N devices (default: all)")
  p.add_argument("--save-overlays", type=int, default=0, metavar="N",
                 help="write prediction | ground-truth overlays for the first N images of each split")
  p.add_argument("--read-threads", type=int, default=4, help="host threads decoding images and masks")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="persistent compilation cache directory (makes later runs start faster)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("eval", help="referring-segmentation evaluation (gIoU / cIoU) of a converted checkpoint on prepared splits")
def eval_cmd(args: argparse.Namespace) -> int:
  from evf_jax import evaluate
  from evf_jax.predictor import enable_compilation_cache
  if args.batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.size_multiple < 1:
    raise UserError(f"--size-multiple must be >= 1, got {args.size_multiple}")
  if args.save_overlays < 0:
    raise UserError(f"--save-overlays must be >= 0, got {args.save_overlays}")
  attention_impl = _attention_impl(args)
  devices = None
  if args.num_devices is not None:
    import jax
    if not 1 <= args.num_devices <= jax.device_count():
      raise UserError(f"--num-devices {args.num_devices}: there are {jax.device_count()} devices")
    devices = jax.devices()[:args.num_devices]
  if args.compilation_cache:
    enable_compilation_cache(args.compilation_cache)
  options = evaluate.EvalOptions(batch_size=args.batch_size, size_multiple=args.size_multiple,
                                 read_threads=args.read_threads, save_overlays=args.save_overlays,
                                 progress=not args.no_progress)
  results = evaluate.evaluate_checkpoint(args.checkpoint, args.data, args.split, out_dir=args.out_dir,
                                         options=options, precision=args.precision,
                                         attention_impl=attention_impl, devices=devices)
  print(evaluate.format_table(results))
  print(f"results: {', '.join(r['json'] for r in results)}")
  return 0


eval_cmd.add_arguments = _eval_args


def _demo_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default="workdir/demo", help="where the data, checkpoint and outputs go")
  p.add_argument("--num-train", type=int, default=64, help="synthetic training images to generate")
  p.add_argument("--num-eval", type=int, default=8, help="synthetic validation images to generate")
  p.add_argument("--seed", type=int, default=0)


@command("demo", help="the embedded default job: synthetic data, a random-weight tiny model, predict and "
                      "evaluate (no downloads; training is not built yet)")
def demo_cmd(args: argparse.Namespace) -> int:
  from evf_jax.demo import run_demo
  run_demo(args.workdir, num_train=args.num_train, num_eval=args.num_eval, seed=args.seed)
  return 0


demo_cmd.add_arguments = _demo_args
