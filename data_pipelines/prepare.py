"""`run.py prepare`: raw download (or the synthetic generator) -> ArrayRecord shards in the records.py format.

Writes into `OUT.partial` and renames it to OUT only when everything succeeded, so an interrupted run never
leaves something that looks like a finished dataset. Refuses an existing non-empty OUT. Images that are
missing, corrupt, or disagree with their annotations are skipped and counted (meta.json "skipped"), never fatal.
"""

from __future__ import annotations

import collections
import os
import shutil
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

from data_pipelines import readers, records, synthetic
from evf_jax.errors import UserError
from evf_jax.images import ImageReadError, decode_image

DATASETS = sorted(readers.READERS) + ["synthetic"]


def _check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"{out} already exists and is not empty; choose another --out or remove it")


def _image_size(data: bytes) -> tuple[int, int]:
  """(h, w) of the image as every later stage decodes it (`evf_jax.images.decode_image`: EXIF applied)."""
  return decode_image(data).shape[:2]


def _records_from_tasks(tasks: list[readers.ImageTask], skipped: collections.Counter) -> Iterator[tuple[str, records.Record]]:
  for task in tasks:
    try:
      with open(task.path, "rb") as f:
        data = f.read()
    except OSError:
      skipped["missing_image"] += 1
      continue
    try:
      h, w = _image_size(data)
    except ImageReadError:
      skipped["corrupt_image"] += 1
      continue
    if task.expected_hw is not None and (h, w) != task.expected_hw:
      skipped["image_size_mismatch"] += 1  # e.g. an EXIF rotation the annotations were not made on
      continue
    try:
      entries, masks = task.build(h, w)
    except readers.SkipImage as e:
      skipped[e.reason] += 1
      continue
    if not entries:
      skipped["no_prompts"] += 1
      continue
    # source is filled in by write_dataset
    yield task.split, records.Record(source="", image_id=task.image_id, image=data, h=h, w=w,
                                     masks=masks, entries=entries)


def write_dataset(out: str, dataset: str, items: Iterable[tuple[str, records.Record]], total: Optional[int],
                  records_per_shard: int = 2000, extra_meta: Optional[dict] = None,
                  skipped: Optional[collections.Counter] = None, progress: bool = True) -> dict:
  """Writes (split, record) pairs as shards + meta.json into `out` (atomically via `out.partial`)."""
  _check_out(out)
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted run
  os.makedirs(tmp)
  skipped = skipped if skipped is not None else collections.Counter()
  writers: dict[str, records.ShardWriter] = {}
  entries: collections.Counter = collections.Counter()
  for split, rec in tqdm(items, total=total, desc=f"prepare {dataset}", unit="img", disable=not progress):
    rec.source = dataset
    if split not in writers:
      writers[split] = records.ShardWriter(tmp, split, records_per_shard)
    writers[split].write(records.serialize(rec))
    entries[split] += len(rec.entries)
  splits = {}
  for split, wr in sorted(writers.items()):
    paths = wr.close()
    splits[split] = {"images": wr.count, "prompts": entries[split], "shards": len(paths)}
  records.write_meta(tmp, {"dataset": dataset, "splits": splits, "skipped": dict(skipped), **(extra_meta or {})})
  if os.path.isdir(out):
    os.rmdir(out)  # exists but empty (checked above)
  os.replace(tmp, out)
  return {"dataset": dataset, "splits": splits, "skipped": dict(skipped)}


def prepare(dataset: str, out: str, src: Optional[str] = None, *, num_train: int = 2000, num_eval: int = 200,
            seed: int = 0, records_per_shard: int = 2000, progress: bool = True) -> dict:
  """Converts one dataset; returns the summary that is also stored in OUT/meta.json."""
  _check_out(out)
  if dataset == "synthetic":
    if src:
      raise UserError("--src is not used with --dataset synthetic (it is generated, see --num-train/--seed)")
    return write_dataset(out, dataset, synthetic.generate(seed, num_train, num_eval), num_train + num_eval,
                         records_per_shard, {"seed": seed}, progress=progress)
  if dataset not in readers.READERS:
    raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
  if not src:
    raise UserError(f"--src is required for --dataset {dataset}")
  if not os.path.isdir(src):
    raise UserError(f"--src {src} is not a directory")
  tasks = readers.READERS[dataset](src)
  if not tasks:
    raise UserError(f"{dataset}: found no images to convert under {src}")
  skipped: collections.Counter = collections.Counter()
  summary = write_dataset(out, dataset, _records_from_tasks(tasks, skipped), len(tasks), records_per_shard,
                          {"src": os.path.abspath(src)}, skipped, progress)
  return summary
