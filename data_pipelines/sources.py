"""Where a dataset lives, and its records read from there: TFDS datasets or the old prepared format.

A location is one of
  - a TFDS dataset: `TfdsDataset(name, data_dir)`, read with `tfds.data_source(name, split=..., data_dir=...)`
    (split slicing included, "train[:1%]"); or a path to its folder, DATA_DIR/NAME[/CONFIG][/VERSION]. Our
    builders (data_pipelines/tfds_builders) and TFDS's own `ref_coco` (configs refcoco_unc, refcocoplus_unc,
    refcocog_umd, ...) are understood;
  - a directory written by the old `run.py prepare --out` (records.py, meta.json): read for one more release,
    with a DeprecationWarning; `run.py prepare --dataset NAME --src OLD_DIR --data_dir DATA` converts it.

`open_split(location, split)` gives a random-access source of `records.Record`s (len, [i]) that grain reads
(pickles for its worker processes); the records are made in `__getitem__`, i.e. in grain's reader threads.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import warnings

import grain
import tensorflow_datasets as tfds
from PIL import Image

# Importing tfds_builders registers our builders with TFDS.
from data_pipelines import records, tfds_builders
from evf_jax import storage
from evf_jax.errors import UserError, first_line

DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"    # TFDS's feature spec
METADATA = "metadata.json"    # what our builders add: prompts per split, skipped images, arguments
REF_COCO = "ref_coco"
# TFDS ref_coco config -> our dataset name (Record.source; the eval split names use ours).
REF_COCO_DATASETS = {"refcoco": "refcoco", "refcocoplus": "refcoco+", "refcocog": "refcocog"}
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  name: str      # "synthetic", "refcocoplus", "ref_coco/refcoco_unc", optionally ":VERSION"
  data_dir: str

  @property
  def builder(self) -> str:
    return self.name.split("/")[0].split(":")[0]

  @property
  def config(self) -> str | None:
    parts = self.name.split(":")[0].split("/")
    return parts[1] if len(parts) > 1 else None


@dataclasses.dataclass(frozen=True)
class LegacyDataset:
  directory: str


Location = str | os.PathLike | TfdsDataset | LegacyDataset


def is_legacy(path: str) -> bool:
  return os.path.isfile(os.path.join(path, records.META_FILE))


def _versions(path: str) -> list[str]:
  if not os.path.isdir(path):
    return []
  found = [v for v in os.listdir(path) if _VERSION.match(v) and os.path.isfile(os.path.join(path, v, DATASET_INFO))]
  return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def _json_object(path: str) -> dict:
  """A JSON file of a prepared dataset that must hold an object; DataReadError naming it otherwise."""
  return storage.read_json(path, DataReadError, "the dataset is damaged: prepare it again")


def _info(version_dir: str) -> dict:
  return _json_object(os.path.join(version_dir, DATASET_INFO))


def _config_of(path: str) -> str | None:
  versions = _versions(path)
  return _info(os.path.join(path, versions[-1])).get("configName") if versions else None


def tfds_at(path: str) -> TfdsDataset | None:
  """The TFDS dataset whose folder is `path` (DATA_DIR/NAME[/CONFIG][/VERSION]; the newest version when none
  is named), or None. A NAME folder holding several configs is ambiguous: ValueError naming them."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, DATASET_INFO)):
    version_dir = path
  else:
    versions = _versions(path)
    if not versions:
      configs = [c for c in sorted(os.listdir(path)) if _config_of(os.path.join(path, c)) == c] \
          if os.path.isdir(path) else []
      if configs:  # (a data_dir has NAME/VERSION folders too, but their info names no config)
        raise ValueError(f"{path} holds the TFDS configs {', '.join(configs)}: name one, e.g. {path}/{configs[0]}")
      return None
    version_dir = os.path.join(path, versions[-1])
  info = _info(version_dir)
  for other in (FEATURES, METADATA):  # TFDS reads the first (a bad one raised protobuf's ParseError), we the second
    if os.path.exists(os.path.join(version_dir, other)):
      _json_object(os.path.join(version_dir, other))
  if not all(isinstance(info.get(key), str) for key in ("name", "version")):
    raise DataReadError(f"{os.path.join(version_dir, DATASET_INFO)}: names no dataset (its name and version are "
                        "missing); the dataset is damaged: prepare it again")
  name, config, version = info["name"], info.get("configName"), info["version"]
  up = 3 if config else 2
  data_dir = functools.reduce(lambda p, _: os.path.dirname(p), range(up), version_dir)
  return TfdsDataset(f"{name}/{config}:{version}" if config else f"{name}:{version}", data_dir)


def locate(location: Location) -> TfdsDataset | LegacyDataset:
  """A location as TfdsDataset or LegacyDataset; FileNotFoundError when a path holds neither."""
  if isinstance(location, (TfdsDataset, LegacyDataset)):
    return location
  path = os.fspath(location)
  if is_legacy(path):
    return LegacyDataset(path)
  found = tfds_at(path)
  if found is None:
    raise FileNotFoundError(f"{path} is neither a TFDS dataset (DATA_DIR/NAME[/CONFIG]/VERSION/{DATASET_INFO}) "
                            f"nor an old prepared dataset ({records.META_FILE}); build it with `run.py prepare`")
  return found


class OldFormatWarning(DeprecationWarning):
  """The old prepared format is used. Shown by default (Python hides DeprecationWarnings raised outside
  __main__), since the one who can act on it is the user running `run.py`."""


warnings.simplefilter("always", OldFormatWarning)  # once per directory: warn_legacy keeps count


def warn_legacy(directory: str) -> None:
  """Once per directory and process."""
  if directory in _warned:
    return
  _warned.add(directory)
  warnings.warn(f"{directory} is in the old prepared format (records.py), read for one more release; convert it "
                "with `run.py prepare --dataset NAME --src OLD_DIR --data_dir DATA_DIR` (synthetic: generate it again, "
                "without --src; docs/data.md#2-raw-datasets)",
                OldFormatWarning, stacklevel=3)


# ---------------------------------------------------------------- record sources

class LegacySource:
  """An old prepared split (ArrayRecord of msgpack records) -> Records."""

  def __init__(self, directory: str, split: str):
    self.directory, self.split = directory, split
    self._source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> records.Record:
    return records.deserialize(self._source[index])


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _image_size(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as im:  # reads the header only
    return im.height, im.width


def ref_coco_to_record(ex: dict, source: str, train: bool) -> records.Record:
  """A TFDS `ref_coco` example (image read with SkipDecoding; masks decoded by TFDS, which cannot skip
  decoding inside a Sequence) -> Record: one mask per object, one entry per raw sentence of it
  (`strip().lower()`-ed outside train, docs/data.md#5-evaluation-protocol)."""
  objects = ex["objects"]
  masks = list(objects["mask"])
  entries = []
  refexp = objects["refexp"]  # numpy mode: {"raw": [per object: array of sentences], "refexp_id": [...]}
  for i, (obj_id, raws, sent_ids) in enumerate(zip(objects["id"], refexp["raw"], refexp["refexp_id"])):
    for raw, sent_id in zip(raws, sent_ids):
      text = _text(raw)
      entries.append(records.Entry(text if train else text.strip().lower(), i,
                                   {"ann_ids": [int(obj_id)], "sent_id": int(sent_id)}))
  image = bytes(ex["image"])
  # Masks are made at the annotations' image size, which is the record's (h, w).
  h, w = masks[0].shape[:2] if masks else _image_size(image)
  return records.Record(source=source, image_id=str(int(ex["image/id"])), image=image, h=h, w=w, masks=masks,
                        entries=entries, mask_format="array")


def _base_split(split: str) -> str:
  return re.split(r"[\[+(]", split, maxsplit=1)[0].strip()


class SplitError(UserError, ValueError):
  """A split (or slice, "val[:10]") the dataset does not have: the user's --split."""


class DataReadError(UserError, RuntimeError):
  """A prepared dataset whose files cannot be read (cut short, deleted, overwritten): prepare it again."""


class TfdsSource:
  """`tfds.data_source(name, split=..., data_dir=...)` -> Records (our features or TFDS's ref_coco)."""

  def __init__(self, dataset: TfdsDataset, split: str):
    self.dataset, self.split = dataset, split
    if dataset.builder == REF_COCO:
      config = dataset.config or ""
      self._source_name = REF_COCO_DATASETS.get(config.rsplit("_", 1)[0], config)
    else:
      self._source_name = dataset.builder
    decoders = {"image": tfds.decode.SkipDecoding()}  # the image bytes as stored; decoded by the transforms
    self._train = _base_split(split) == "train"
    try:
      self._source = tfds.data_source(dataset.name, split=split, data_dir=dataset.data_dir, download=False,
                                      decoders=decoders)
    except (KeyError, ValueError) as e:  # unknown split, bad slice; TFDS's message goes on with a link
      # An empty slice ("val[:0]") reaches array_record as no files at all, whose message says only that.
      reason = "selects no examples" if "Paths sequence can not be of 0 length" in str(e) else first_line(e)
      raise SplitError(f"{dataset.name} in {dataset.data_dir}: split {split!r}: {reason}") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> records.Record:
    try:
      ex = self._source[index]
    except (RuntimeError, OSError, ValueError) as e:  # array_record's errors for a cut or missing shard, a bad record
      raise DataReadError(f"{self.dataset.name} in {self.dataset.data_dir}: split {self.split!r}: cannot read example "
                          f"{index} ({first_line(e)}); its files are damaged or missing: prepare it again") from None
    if self.dataset.builder == REF_COCO:
      return ref_coco_to_record(ex, self._source_name, self._train)
    return tfds_builders.example_to_record(ex, self._source_name)


def open_split(location: Location, split: str):
  """A random-access source of the split's Records; DeprecationWarning (once) for the old format.

  Its first example is read: files that cannot be read (a copy cut short, a shard deleted) are refused here, in
  one line (`DataReadError`), rather than after a checkpoint load or inside a reading thread."""
  where = locate(location)
  if isinstance(where, LegacyDataset):
    warn_legacy(where.directory)
    source = LegacySource(where.directory, split)
  else:
    source = TfdsSource(where, split)
  if len(source):
    source[0]
  return source


def describe(location: Location) -> dict:
  """{"dataset", "splits": {name: {"images", ...}}, "skipped", ...}: meta.json of the old format, or the TFDS
  dataset's split sizes with what our builders keep in its metadata.json (prompts per split, skipped images)."""
  where = locate(location)
  if isinstance(where, LegacyDataset):
    return records.read_meta(where.directory)
  builder = tfds.builder(where.name, data_dir=where.data_dir)
  meta_path = os.path.join(str(builder.data_dir), METADATA)
  meta = _json_object(meta_path) if os.path.isfile(meta_path) else {}
  prompts = meta.get("prompts", {})
  splits = {name: {"images": int(info.num_examples), "shards": len(info.shard_lengths),
                   **({"prompts": int(prompts[name])} if name in prompts else {})}
            for name, info in sorted(builder.info.splits.items())}
  dataset = meta.get("dataset") or (REF_COCO_DATASETS.get((where.config or "").rsplit("_", 1)[0])
                                    if where.builder == REF_COCO else where.builder)
  return {**meta, "dataset": dataset, "splits": splits, "skipped": meta.get("skipped", {}),
          "tfds": {"name": where.name, "data_dir": where.data_dir, "path": str(builder.data_dir)}}


def read_records(location: Location, split: str) -> list[records.Record]:
  """All records of a split (tests and small tools; the pipeline reads lazily through grain)."""
  src = open_split(location, split)
  return [src[i] for i in range(len(src))]

