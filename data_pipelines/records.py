"""The on-disk record format shared by every dataset: one ArrayRecord record per image.

A record is one msgpack map (msgpack comes with flax) with these keys, format version 1:

  "v"        int     format version (FORMAT_VERSION); readers refuse other versions
  "source"   str     dataset name, e.g. "refcoco", "ade20k", "synthetic"
  "image_id" str     id of the image inside its dataset (str(int) for COCO-style ids)
  "image"    bytes   the encoded image file exactly as found in the download (JPEG/PNG), never re-encoded
  "h", "w"   int     image height and width in pixels (checked against the decoded image when preparing)
  "masks"    list    of COCO compressed-RLE counts (bytes); every mask is h x w, values {0, 1}
  "entries"  list    of [text, mask_index, ids]: one prompt (one sentence, one class name, ...) and the
                     index of its mask in "masks"; several entries may share a mask (sentences of one ref).
                     ids is a small str->int/list map for traceability: e.g. {"ref_id", "sent_id",
                     "ann_ids"} for RefCOCO, {"class_id"} for semantic sets.

Train records hold every (prompt, mask) candidate of the image; the pipeline draws up to K of them per sample.
Eval records hold every sentence of every ref of that split on the image (docs/data.md#5-evaluation-protocol), text already
`strip().lower()`-ed. Masks are stored once, already clipped to {0,1} (unions of polygons / instances).

A prepared dataset directory looks like
  DIR/meta.json                           {"format": "evf-records", "version": 1, "dataset": ..., "splits": {...}}
  DIR/<split>-00000-of-00003.array_record ...
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from pycocotools import mask as mask_utils

FORMAT_VERSION = 1
FORMAT_NAME = "evf-records"
META_FILE = "meta.json"


@dataclasses.dataclass
class Entry:
  text: str
  mask_index: int
  ids: dict


@dataclasses.dataclass
class Record:
  source: str
  image_id: str
  image: bytes
  h: int
  w: int
  masks: list  # of RLE counts (bytes), or arrays when mask_format == "array"
  entries: list  # of Entry
  mask_format: str = "rle"  # "array": (h, w[, c]) arrays, nonzero = 1 (TFDS ref_coco's; never serialised)

  def mask(self, index: int) -> np.ndarray:
    """Decodes mask `index` to an (h, w) uint8 array of 0/1."""
    if self.mask_format == "array":
      m = np.asarray(self.masks[index])
      return (m if m.ndim == 2 else m[..., 0] if m.shape[-1] == 1 else m.max(axis=-1)).astype(bool).astype(np.uint8)
    return decode_rle(self.masks[index], self.h, self.w)


def encode_mask(mask: np.ndarray) -> bytes:
  """(h, w) array of {0,1} (or bool) -> compressed RLE counts."""
  m = np.asfortranarray(np.asarray(mask, dtype=np.uint8) != 0, dtype=np.uint8)
  return mask_utils.encode(m)["counts"]


def decode_rle(counts: bytes, h: int, w: int) -> np.ndarray:
  return mask_utils.decode({"size": [h, w], "counts": counts}).astype(np.uint8)


def serialize(rec: Record) -> bytes:
  if rec.mask_format != "rle":
    raise ValueError(f"the records.py format stores RLE masks, not {rec.mask_format!r}")
  return msgpack.packb({
      "v": FORMAT_VERSION, "source": rec.source, "image_id": str(rec.image_id), "image": rec.image,
      "h": int(rec.h), "w": int(rec.w), "masks": list(rec.masks),
      "entries": [[e.text, int(e.mask_index), e.ids] for e in rec.entries],
  }, use_bin_type=True)


def deserialize(data: bytes) -> Record:
  d = msgpack.unpackb(data, raw=False)
  if d.get("v") != FORMAT_VERSION:
    raise ValueError(f"record format version {d.get('v')!r}, this code reads version {FORMAT_VERSION}")
  return Record(source=d["source"], image_id=d["image_id"], image=d["image"], h=d["h"], w=d["w"],
                masks=d["masks"], entries=[Entry(t, i, ids) for t, i, ids in d["entries"]])


def write_meta(out_dir: str, meta: dict[str, Any]) -> None:
  meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}
  with open(os.path.join(out_dir, META_FILE), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)


def read_meta(data_dir: str) -> dict[str, Any]:
  path = os.path.join(data_dir, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{data_dir} is not a prepared dataset (no {META_FILE}); run `run.py prepare` first")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')!r}, "
                     f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
  return meta


def shard_paths(data_dir: str, split: str) -> list[str]:
  """The ArrayRecord shards of one split, in order."""
  paths = sorted(glob.glob(os.path.join(data_dir, f"{split}-*-of-*.array_record")))
  if not paths:
    splits = read_meta(data_dir).get("splits", {})
    raise FileNotFoundError(f"{data_dir}: no shards for split {split!r} (splits: {sorted(splits)})")
  return paths


class ShardWriter:
  """Writes records in order into `split-0000i-of-0000N` shards of at most `records_per_shard` each.

  The number of shards is only known at the end, so shards are written under temporary names and renamed.
  """

  def __init__(self, out_dir: str, split: str, records_per_shard: int = 2000):
    self.out_dir, self.split, self.records_per_shard = out_dir, split, records_per_shard
    self.count = 0
    self._paths: list[str] = []
    self._writer = None

  def write(self, data: bytes) -> None:
    if self._writer is None or self.count % self.records_per_shard == 0:
      self._close_current()
      path = os.path.join(self.out_dir, f".{self.split}-{len(self._paths):05d}.partial")
      self._paths.append(path)
      # group_size:1 -> every record is its own chunk, so random access reads one record, not a group.
      self._writer = ArrayRecordWriter(path, "group_size:1")
    self._writer.write(data)
    self.count += 1

  def _close_current(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> list[str]:
    self._close_current()
    n = len(self._paths)
    final = []
    for i, p in enumerate(self._paths):
      q = os.path.join(self.out_dir, f"{self.split}-{i:05d}-of-{n:05d}.array_record")
      os.replace(p, q)
      final.append(q)
    return final


def read_records(data_dir: str, split: str) -> Sequence[Record]:
  """All records of a split, decoded (for tests and small tools; the pipeline reads lazily through grain).
  `data_dir` may also be a TFDS dataset folder (data_pipelines.sources)."""
  from data_pipelines import sources  # lazy: sources imports this module (it reads this format too)
  if not os.path.isfile(os.path.join(data_dir, META_FILE)):
    return sources.read_records(data_dir, split)
  src = grain.sources.ArrayRecordDataSource(shard_paths(data_dir, split))
  return [deserialize(src[i]) for i in range(len(src))]
