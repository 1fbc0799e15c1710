#!/usr/bin/env python3
"""Input-pipeline throughput (samples/s) on the synthetic set and on a RefCOCO-format fixture, read from
the TFDS datasets `run.py prepare` builds and from the old prepared format (the reader before TFDS), in the
same run.

  .venv/bin/python -m benchmarks.data_throughput --workers 0 2 --batch-size 8 --batches 10

Builds both datasets in a temp dir both ways (the RefCOCO-format one: 640x480 JPEGs, 3 refs x 2 sentences per
image, polygon masks, converted by the real readers), then times `train_iterator` after one warm-up batch,
alternating the two readers `--rounds` times so that a machine busy with other work slows both alike; prints
the median of the rounds. "records/s" is the reader alone: every record of the split as a `records.Record`.
A tiny sentencepiece model stands in for the BEiT-3 tokenizer unless --tokenizer-model is given.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
import warnings

import numpy as np
from PIL import Image


def write_refcoco_like(src: str, n: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  img_dir = os.path.join(src, "images", "mscoco", "images", "train2014")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(os.path.join(src, "refcoco"), exist_ok=True)
  images, anns, refs = [], [], []
  for i in range(n):
    h, w = (480, 640) if i % 2 else (640, 427)
    # Smooth noise compresses like a photo (~100 KB JPEG), unlike white noise.
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(img_dir, f"{i}.jpg"), quality=90)
    images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
    for j in range(3):
      ann_id = i * 10 + j
      cx, cy, r = rng.uniform(100, w - 100), rng.uniform(100, h - 100), rng.uniform(30, 90)
      t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
      poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).ravel().tolist()
      anns.append({"id": ann_id, "image_id": i, "category_id": 1, "segmentation": [poly], "iscrowd": 0})
      refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "category_id": 1, "split": "train",
                   "sentences": [{"sent_id": 2 * ann_id + k, "sent": f"the round thing number {j} {k}"}
                                 for k in range(2)]})
  with open(os.path.join(src, "refcoco", "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
  with open(os.path.join(src, "refcoco", "refs(unc).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)


def measure(ds, workers: int, batches: int, batch_size: int, read_threads: int) -> tuple[float, float]:
  """(samples/s, CPU ms of this process per sample; the CPU time is meaningless with worker processes)."""
  from data_pipelines import pipeline
  it = pipeline.train_iterator(ds, worker_count=workers, read_threads=read_threads)
  next(it)  # warm-up: worker start, file opening
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    b = next(it)
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  del b
  it.close()
  return batches * batch_size / dt, 1e3 * dc / (batches * batch_size)


def reader_rate(location, split: str = "train", passes: int = 3) -> float:
  """Records/s of the reader alone: every record of the split as a records.Record (opening not counted)."""
  from data_pipelines import sources
  src = sources.open_split(location, split)
  n = len(src)
  src[0]
  t0 = time.perf_counter()
  for _ in range(passes):
    for i in range(n):
      src[i]
  return passes * n / (time.perf_counter() - t0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workers", type=int, nargs="+", default=[0], help="grain mp_prefetch worker counts to try")
  ap.add_argument("--read-threads", type=int, default=2, help="grain ReadOptions.num_threads (in-process)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--batches", type=int, default=10, help="timed batches per setting")
  ap.add_argument("--sam-size", type=int, default=1024)
  ap.add_argument("--images", type=int, default=64, help="images per benchmark dataset")
  ap.add_argument("--tokenizer-model", default=None, help="a sentencepiece .model (default: train a tiny one)")
  ap.add_argument("--rounds", type=int, default=5, help="alternating old/TFDS measurements per setting")
  args = ap.parse_args()

  from data_pipelines import pipeline, prepare
  from data_pipelines.transforms import SampleConfig
  from evf_testing.data_fixtures import SpTokenizer, train_tokenizer
  # After the imports: data_pipelines.sources shows its OldFormatWarning by default.
  warnings.filterwarnings("ignore", category=DeprecationWarning)  # the old format, read and written on purpose

  tmp = tempfile.mkdtemp(prefix="evf_bench_")
  tok = SpTokenizer(args.tokenizer_model) if args.tokenizer_model else train_tokenizer(tmp)
  data_dir = os.path.join(tmp, "tfds")
  prepare.build("synthetic", data_dir, num_train=args.images, num_eval=1, progress=False)
  prepare.prepare("synthetic", os.path.join(tmp, "old", "synthetic"), num_train=args.images, num_eval=1,
                  progress=False)
  write_refcoco_like(os.path.join(tmp, "raw"), args.images)
  prepare.build("refcoco", data_dir, os.path.join(tmp, "raw"), progress=False)
  prepare.prepare("refcoco", os.path.join(tmp, "old", "refcoco"), os.path.join(tmp, "raw"), progress=False)

  cfg = SampleConfig(sam_size=args.sam_size)
  print(f"cpus={os.cpu_count()} batch={args.batch_size} sam_size={args.sam_size} read_threads={args.read_threads} "
        f"rounds={args.rounds} (median)")
  for name in ("synthetic", "refcoco"):
    where = {"old": os.path.join(tmp, "old", name), "tfds": os.path.join(data_dir, name)}
    datasets = {k: pipeline.train_dataset({name: (1, [d])}, tok, global_batch_size=args.batch_size, seed=0,
                                          sample=cfg, process_index=0, process_count=1) for k, d in where.items()}
    rates = {k: [] for k in where}
    for _ in range(args.rounds):
      for k, d in where.items():
        rates[k].append(reader_rate(d))
    print(f"{name:10s} reader only:  old {statistics.median(rates['old']):8.1f} records/s   "
          f"tfds {statistics.median(rates['tfds']):8.1f} records/s")
    for w in args.workers:
      runs = {k: [] for k in where}
      for r in range(args.rounds):
        for k in (("old", "tfds") if r % 2 == 0 else ("tfds", "old")):  # neither always goes first
          runs[k].append(measure(datasets[k], w, args.batches, args.batch_size, args.read_threads))
      (old, old_cpu), (new, new_cpu) = ([statistics.median(x) for x in zip(*runs[k])] for k in ("old", "tfds"))
      print(f"{name:10s} workers={w}:    old {old:8.1f} samples/s   tfds {new:8.1f} samples/s   "
            f"({new / old:.2f}x)" + (f"   CPU ms/sample: old {old_cpu:.1f}, tfds {new_cpu:.1f}" if w == 0 else ""))


if __name__ == "__main__":
  main()
