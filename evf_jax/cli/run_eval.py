"""`run.py eval`: gIoU / cIoU of a checkpoint on prepared splits; a JSON per split and a table.

The protocol and the sharded step are `evf_jax.evaluate`; this module finds the data, reads it into examples,
writes the results (with the checkpoint's provenance) and optional overlays. `evaluate_split` is also the
training run's periodic evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from data_pipelines import eval_splits, pipeline, sources
from data_pipelines.eval_splits import EvalSplit
from data_pipelines.transforms import SampleConfig
from evf_jax import checkpoints, evaluate, families, storage
from evf_jax.cli import cluster, common
from evf_jax.errors import UserError
from evf_jax.evf import cast_kernels
from evf_jax.images import decode_image, overlay
from evf_jax.runtime import (check_accelerator_in_use, check_precision_platform, compute_dtype,
                             enable_compilation_cache)
from evf_jax.train import checkpointing


PROTOCOL = ("EVF-SAM eval.py: every sentence a prompt, logits > 0 at the original resolution; "
            "cIoU = sum I / sum U, gIoU = mean I/U per sentence (empty union = 1)")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = (
      "Splits are named as in EVF-SAM's eval.py, DATASET|SPLITBY|SPLIT (quote them in a shell):\n"
      "  the eight standard ones (--split standard selects all): " + ", ".join(eval_splits.STANDARD_SPLITS) + "\n"
      "  also: refclef|unc|{val,testA,testB,testC}, grefcoco|unc|{val,testA,testB}, synthetic|val,\n"
      "  and NAME|SPLIT for a dataset of your own (run.py prepare --dataset custom --name NAME)\n"
      "  a TFDS slice reads part of a split: 'refcoco|unc|val[:10%]'\n"
      "Data: --data ROOT is a TFDS data_dir holding one dataset per name (docs/data.md#2-raw-datasets):\n"
      "  python run.py prepare --dataset refcoco --src dataset/refer_seg --data_dir ROOT\n"
      "  python run.py prepare --dataset synthetic --data_dir ROOT\n"
      "so 'refcoco|unc|val' reads split 'val' of ROOT/refcoco ('refcoco+' is ROOT/refcocoplus). TFDS's own\n"
      "ref_coco in ROOT is read too (ROOT/ref_coco/refcoco_unc, ...). --data may also be one dataset's folder.\n"
      "Output: OUT_DIR/<DATASET_SPLITBY_SPLIT>.json per split (gIoU/cIoU as fractions, counts, timing,\n"
      "devices, batch size, checkpoint provenance) and a table on stdout (IoUs in percent).")
  p.add_argument("--checkpoint", required=True,
                 help="an evf-jax checkpoint directory (from `run.py convert`, or a training run's export/)")
  p.add_argument("--data", required=True, help="root of prepared datasets (see below)")
  p.add_argument("--split", action="append", required=True, metavar="SPLIT",
                 help="a split such as 'refcoco|unc|val', or 'standard'; repeat for several")
  p.add_argument("--out-dir", default="eval_results", help="where the JSON results go (default: eval_results)")
  p.add_argument("--batch-size", type=int, default=8,
                 help="images per step, all their sentences included; rounded up to a multiple of the device "
                      "count (every image is evaluated exactly once whatever the value)")
  common.add_compute_args(p, "compute precision (the reference evaluates in fp16 by default)")
  p.add_argument("--size-multiple", type=int, default=evaluate.EvalOptions.size_multiple,
                 help="original image sizes are padded up to a multiple of this (fewer compiled shapes)")
  p.add_argument("--num-devices", type=int, default=None, help="use only the first N devices (default: all)")
  p.add_argument("--save-overlays", type=int, default=0, metavar="N",
                 help="write prediction | ground-truth overlays for the first N images of each split")
  p.add_argument("--read-threads", type=int, default=4, help="host threads decoding images and masks")
  common.add_overwrite_arg(p)
  p.add_argument("--skip-existing", action="store_true",
                 help="keep the splits whose JSON an earlier run of this evaluation (same checkpoint, data, "
                      "precision and attention) wrote to --out-dir, evaluate the others: run again with it to "
                      "continue an interrupted run")
  common.add_compilation_cache_arg(p)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  cluster.add_arguments(p)


def run(args: argparse.Namespace) -> int:
  # Every process of a pod slice or cluster runs this command; each reads its share of every split's images.
  return cluster.run_joined(cluster.initialise_from_args(args), lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
  for flag, value, low in (("--batch-size", args.batch_size, 1), ("--size-multiple", args.size_multiple, 1),
                           ("--save-overlays", args.save_overlays, 0), ("--read-threads", args.read_threads, 1)):
    if value < low:
      raise UserError(f"{flag} must be >= {low}, got {value}")
  if args.skip_existing and args.overwrite:
    raise UserError("--skip-existing keeps finished splits and --overwrite replaces them: choose one")
  check_accelerator_in_use()
  common.check_compute_args(args)
  devices = None
  if args.num_devices is not None:
    if jax.process_count() > 1:
      raise UserError("--num-devices needs a single process: several evaluate on all their devices")
    if not 1 <= args.num_devices <= jax.device_count():
      raise UserError(f"--num-devices {args.num_devices}: there are {jax.device_count()} devices")
    devices = jax.devices()[:args.num_devices]
  if args.compilation_cache:
    enable_compilation_cache(args.compilation_cache)
  options = evaluate.EvalOptions(batch_size=args.batch_size, size_multiple=args.size_multiple,
                                 read_threads=args.read_threads, progress=not args.no_progress)
  results = evaluate_checkpoint(args.checkpoint, args.data, args.split, out_dir=args.out_dir, options=options,
                                precision=args.precision, attention=args.attention, devices=devices,
                                save_overlays=args.save_overlays, overwrite=args.overwrite,
                                skip_existing=args.skip_existing)
  if jax.process_index() == 0:  # the results are those of all processes
    print(format_table(results))
    print(f"results: {', '.join(r['json'] for r in results if 'json' in r)}")
  return 0


def locate_splits(data: str, split_names: Sequence[str]) -> list[tuple[EvalSplit, sources.Location, dict]]:
  """[(split as its source names it, the dataset's location, its description)]; UserError for any problem,
  before loading."""
  splits = eval_splits.expand_splits(split_names)
  if not splits:
    raise UserError("no --split given")
  written: dict[str, str] = {}
  for s in splits:  # e.g. "a|b_c" and "a_b|c": the second result would replace the first, unnoticed
    if s.tag in written:
      raise UserError(f"--split {written[s.tag]} and --split {s.name} would both write {s.tag}.json; evaluate them "
                      "in separate runs with separate --out-dir")
    written[s.tag] = s.name
  located = [eval_splits.resolve_data_dir(data, s) for s in splits]
  for split, where, _ in located:  # a bad slice ("val[:abc]", beyond the split), damaged files: now, not after
    sources.open_split(where, split.split)  # the checkpoint load and earlier splits
  return located


def evaluate_split(evaluator: evaluate.Evaluator, params: Any, tokenizer, config: families.ModelConfig,
                   directory: sources.Location, split: str, *, name: str, overlay_dir: Optional[str] = None,
                   save_overlays: int = 0) -> dict:
  """One split (`directory`: a location of data_pipelines.sources) with `params`: this process's share of its
  images, the result over all processes.
  EVF-SAM2 frames the images as the original's eval.py does: PIL bilinear to a square, no padding."""
  image_input = families.image_input(config)
  sample = SampleConfig(max_text_len=evaluator.options.max_text_len, sam_size=image_input.size,
                        beit_size=config.beit3.img_size, sam_mode="square" if image_input.square else "longest_side")
  low_res = image_input.low_res
  ds = pipeline.eval_dataset(directory, split, tokenizer, low_res=low_res, sample=sample)
  threads = max(1, evaluator.options.read_threads)
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2 * evaluator.batch_images))
  like = None
  if len(ds) == 0:  # this process has no image of a tiny split; the shapes come from the split's first one
    like = pipeline.eval_dataset(directory, split, tokenizer, low_res=low_res, sample=sample,
                                 process_index=0, process_count=1)[0]
  sink = OverlayWriter(directory, split, overlay_dir, save_overlays) if overlay_dir and save_overlays else None
  result = evaluator.run(params, ds.to_iter_dataset(read), total=len(ds), name=name, sink=sink, like=like)
  if sink is not None and sink.index:
    sink.finish()
    result["overlays"] = sink.directory
  return result


class OverlayWriter:
  """PNG overlays (prediction | ground truth, the reference's colour blend) for the first N images."""

  def __init__(self, data_dir: sources.Location, split: str, directory: str, count: int):
    self.data_dir, self.split, self.directory, self.count = data_dir, split, directory, count
    self.index: list[dict] = []
    self._source = None

  def wants(self, slot: evaluate.Slot) -> bool:
    return slot.index < self.count

  def write(self, slot: evaluate.Slot, preds: np.ndarray, ious: np.ndarray) -> None:
    if self._source is None:
      self._source = sources.open_split(self.data_dir, self.split)
      os.makedirs(self.directory, exist_ok=True)
    rec = self._source[slot.index]  # re-read: the batch holds no original pixels
    image = decode_image(rec.image)
    h, w = image.shape[:2]
    for j, text in enumerate(slot.texts):
      gt = rec.mask(rec.entries[j].mask_index).astype(bool)
      pred = np.asarray(preds[j][:h, :w], bool)
      file = f"{slot.index:05d}_{slot.image_id}_{j}.png".replace("/", "_")
      Image.fromarray(np.concatenate([overlay(image, pred), overlay(image, gt)], axis=1)).save(
          os.path.join(self.directory, file))
      self.index.append({"file": file, "image_id": slot.image_id, "sentence": text, "iou": float(ious[j])})

  def finish(self) -> None:
    with open(os.path.join(self.directory, f"index-{jax.process_index()}.json"
                           if jax.process_count() > 1 else "index.json"), "w") as f:
      json.dump(sorted(self.index, key=lambda d: d["file"]), f, indent=1)


def evaluate_checkpoint(checkpoint: str, data: str, split_names: Sequence[str], *, out_dir: Optional[str],
                        options: evaluate.EvalOptions = evaluate.EvalOptions(), precision: str = "fp32",
                        attention: str = "xla", devices: Optional[Sequence] = None,
                        save_overlays: int = 0, overwrite: bool = False, skip_existing: bool = False) -> list[dict]:
  """Every split of `split_names` with one checkpoint; writes OUT_DIR/<split tag>.json (an existing one only
  with `overwrite`; with `skip_existing` a finished one of the same evaluation is kept and returned as it is).

  Splits, data directories and earlier results are all checked before the (slow) checkpoint load.
  """
  dtype = compute_dtype(precision, attention)
  check_precision_platform(precision)
  located = locate_splits(data, split_names)
  # Read first, so that a directory that is no checkpoint is refused as such. The default (1022) cuts no prompt:
  # a model with fewer text positions cuts at its own limit.
  options = dataclasses.replace(options, max_text_len=min(options.max_text_len, checkpoints.text_positions(checkpoint)))
  provenance = checkpoints.read_provenance(checkpoint)
  same = [{"split": split.name, "data_dir": _data_dir(directory, meta), "precision": precision,
           "attention": attention, "protocol": PROTOCOL, "checkpoint.path": storage.resolve(checkpoint, "--checkpoint"),
           "checkpoint.provenance": provenance} for split, directory, meta in located]
  earlier: list[Optional[dict]] = [None] * len(located)
  if out_dir is not None:  # before the load, not after the first split's hours of work
    storage.check_output_dir(out_dir, "--out-dir")
    checkpointing.check_not_in_a_model(out_dir, "--out-dir")
    earlier = _earlier_results(out_dir, [os.path.join(out_dir, f"{split.tag}.json") for split, _, _ in located],
                               same, overwrite, skip_existing)
    if jax.process_index() == 0 and any(r is not None for r in earlier):
      print(f"kept what an earlier run wrote for {', '.join(r['split'] for r in earlier if r)}")
    if all(r is not None for r in earlier):
      return [r for r in earlier if r]
  config, params, tokenizer = checkpoints.load_checkpoint(checkpoint, max_text_len=options.max_text_len)
  raw_config = checkpoints.read_config(checkpoint)
  evaluator = evaluate.Evaluator(evaluate.evf_predict_fn(config, precision, attention), devices=devices,
                                 options=options)
  params = cast_kernels(params, dtype)
  results = []
  for (split, directory, meta), kept, fields in zip(located, earlier, same):
    if kept is not None:
      results.extend([kept] if kept else [])  # processes other than 0 have not read it
      continue
    if out_dir and not storage.is_url(out_dir):
      _clear_overlays(os.path.join(out_dir, "overlays", split.tag))
    overlay_dir = os.path.join(out_dir, "overlays", split.tag) if out_dir and save_overlays else None
    r = evaluate_split(evaluator, params, tokenizer, config, directory, split.split, name=split.name,
                       overlay_dir=overlay_dir, save_overlays=save_overlays)
    r = {"split": split.name, "dataset": split.dataset, "data_split": split.split, "data_dir": fields["data_dir"],
         **r, "precision": precision, "attention": attention, "protocol": PROTOCOL,
         "checkpoint": {"path": fields["checkpoint.path"],
                        "sam_scale": raw_config.get("sam_scale"),
                        "mm_extractor_scale": raw_config.get("mm_extractor_scale"),
                        "param_dtype": checkpoints.stored_param_dtype(checkpoint, raw_config),
                        "provenance": provenance},
         "dataset_meta": {k: meta.get(k) for k in ("dataset", "skipped", "src", "seed") if k in meta}}
    if out_dir and jax.process_index() == 0:
      path = os.path.join(out_dir, f"{split.tag}.json")
      storage.write_atomic(path, json.dumps(r, indent=2, sort_keys=True))  # one that exists is finished
      r["json"] = path
    results.append(r)
  return results


# What OverlayWriter writes: <index>_<image id>_<sentence>.png and index[-<process>].json.
_OVERLAY_FILE = re.compile(r"^(\d{5}_.+_\d+\.png|index(-\d+)?\.json)$")


def _clear_overlays(directory: str) -> None:
  """An earlier run's overlays of a split evaluated again (--overwrite) would sit beside the new result as if
  they were its own: removed, the files this command writes only."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in os.listdir(directory):
      if _OVERLAY_FILE.match(name):
        os.remove(os.path.join(directory, name))
    if not os.listdir(directory):
      os.rmdir(directory)
  if jax.process_count() > 1:  # before any process writes the new ones
    multihost_utils.sync_global_devices("evf_jax: overlays cleared")


def _data_dir(directory: sources.Location, meta: dict) -> str:
  return meta.get("tfds", {}).get("path") or os.path.abspath(directory.directory)


def _earlier_results(out_dir: str, paths: Sequence[str], same: Sequence[dict], overwrite: bool,
                     skip_existing: bool) -> list[Optional[dict]]:
  """Per split: None to evaluate it; with `skip_existing`, the result at its path if an earlier run of the same
  evaluation wrote it (`same`: the fields that must match), `{}` for that on processes other than 0. Process 0
  decides, since it writes the JSONs (an --out-dir on its own disk is only there), and every process follows: all
  evaluate the same splits, and a refusal stops every process."""
  kept: list[Optional[dict]] = [None] * len(paths)
  refusal = ""
  if jax.process_index() == 0:
    try:
      if skip_existing:
        common.check_no_directories(paths)  # a directory is no finished result, and cannot be written over
        kept = [_finished(path, fields) for path, fields in zip(paths, same)]
      else:
        common.check_not_there(paths, overwrite, ", --skip-existing to keep the splits an earlier run finished")
    except UserError as e:
      refusal = str(e)
  agreed = multihost_utils.broadcast_one_to_all(np.array([bool(refusal), *(k is not None for k in kept)]))
  if agreed[0]:
    raise UserError(refusal or f"process 0 refused --out-dir {out_dir} (its output says why)")
  return [k if k is not None else ({} if done else None) for k, done in zip(kept, agreed[1:])]


def _finished(path: str, same: dict) -> Optional[dict]:
  """The result at `path` if there is one of this evaluation; None if there is none or it is not whole JSON
  (evaluate the split again); UserError if it is another evaluation's."""
  try:
    with open(path) as f:
      result = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(result, dict):
    return None
  for key, want in same.items():
    there = result
    for part in key.split("."):
      there = there.get(part) if isinstance(there, dict) else None
    if there != json.loads(json.dumps(want)):  # as it reads back from JSON
      raise UserError(f"{path} is another evaluation's ({key} {_short(there)} there, {_short(want)} now): pass "
                      "--overwrite to replace it, or choose another --out-dir")
  return {**result, "json": path}


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 80 else text[:77] + "..."


def format_table(results: Sequence[dict]) -> str:
  """The printed summary: one row per split, IoUs in percent."""
  rows = [("split", "images", "sentences", "gIoU", "cIoU", "time", "sent/s")]
  for r in results:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    rows.append((r["split"], str(r["images"]), str(r["sentences"]), pct(r["giou"]), pct(r["ciou"]),
                 f"{r['wall_time_s']:.1f}s", f"{r['sentences_per_s'] or 0:.2f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                   for row in rows)
