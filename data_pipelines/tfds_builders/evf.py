"""One TFDS `GeneratorBasedBuilder` per dataset, sharing the raw-layout readers of `readers.py`.

Every builder writes the same features, the records.py record as TFDS features:

  image      Image     the encoded file exactly as found in the download (JPEG/PNG), never re-encoded;
                       read it back with `decoders={"image": tfds.decode.SkipDecoding()}` to get the bytes
  image_id   Text      id of the image inside its dataset
  height     int32     image height (EXIF applied, as `evf_jax.images.decode_image` decodes it)
  width      int32
  masks      Sequence(Tensor((), object))   COCO compressed-RLE counts, each mask height x width, {0, 1}
  entries    Sequence({text: Text, mask_index: int32, ids: Text})   one prompt each, the index of its mask
                       in `masks`, and its traceability ids as a JSON object

Only one level of `Sequence` and no numpy image arrays: TFDS then writes ArrayRecord without TensorFlow.
The manual dir is the raw download in the layout of docs/data.md#2-raw-datasets (what `--src` was), or a
directory written by the old `run.py prepare --out` (records.py format), which is converted as it is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import re
import types
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import readers, records, synthetic

VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {"1.0.0": "First TFDS release: the records of the old `run.py prepare` (format 1) as features."}
HOMEPAGE = "https://github.com/hustvl/EVF-SAM"

FEATURES = tfds.features.FeaturesDict({
    "image": tfds.features.Image(),
    "image_id": tfds.features.Text(),
    "height": tfds.features.Scalar(np.int32),
    "width": tfds.features.Scalar(np.int32),
    "masks": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "entries": tfds.features.Sequence({
        "text": tfds.features.Text(),
        "mask_index": tfds.features.Scalar(np.int32),
        "ids": tfds.features.Text(),
    }),
})


def record_to_example(rec: records.Record) -> dict:
  return {
      "image": rec.image, "image_id": str(rec.image_id), "height": int(rec.h), "width": int(rec.w),
      "masks": [bytes(m) for m in rec.masks],
      "entries": [{"text": e.text, "mask_index": int(e.mask_index), "ids": json.dumps(e.ids)}
                  for e in rec.entries],
  }


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def example_to_record(ex: dict, source: str) -> records.Record:
  """An example read with SkipDecoding on "image" (numpy mode) -> records.Record."""
  entries = ex["entries"]  # numpy mode: a dict of per-field lists
  texts, indices, ids = entries["text"], entries["mask_index"], entries["ids"]
  return records.Record(
      source=source, image_id=_text(ex["image_id"]), image=bytes(ex["image"]), h=int(ex["height"]),
      w=int(ex["width"]), masks=[bytes(m) for m in ex["masks"]],
      entries=[records.Entry(_text(t), int(i), json.loads(_text(j))) for t, i, j in zip(texts, indices, ids)])


def builder_name(dataset: str) -> str:
  """TFDS name of one of our datasets: "refcoco+" -> "refcocoplus" (TFDS names are identifiers)."""
  return dataset.replace("+", "plus")


def prepare_command(dataset: str, data_dir: str) -> str:
  """The `run.py prepare` command that builds `dataset` into `data_dir` (for messages): the synthetic set is
  generated, the others read raw files from --src; a name we do not know is a dataset of the user's own."""
  if dataset != "synthetic" and dataset not in readers.READERS:
    return f"run.py prepare --dataset {readers.CUSTOM} --name {dataset} --src JSONL_DIR --data_dir {data_dir}"
  src = "" if dataset == "synthetic" else " --src RAW_ROOT"
  return f"run.py prepare --dataset {dataset}{src} --data_dir {data_dir}"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for pre-computed info in gs://tfds-data.

  TFDS calls `initialize_from_bucket` for every builder of a dataset not built yet, and that makes an empty
  temporary directory it never removes (tensorflow-datasets 4.9): one left in /tmp per `run.py prepare`.
  Our datasets are never in that bucket.
  """

  def initialize_from_bucket(self) -> None:
    pass


class EvfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The common builder: `DATASET` (a readers.READERS key) read from the manual dir."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  DATASET = ""
  # Examples keep the readers' order (sorted image ids), so "file order" is the same as the old format's.
  disable_shuffling = True

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly, not with dataset_info_from_configs: that one reads README/CITATIONS files next to the
    # builder's module, one folder per builder, which these share.
    return _LocalDatasetInfo(
        builder=self, description=f"{self.DATASET} as EVF-SAM reads it: images with (prompt, mask) pairs "
        "(data_pipelines/tfds_builders/evf.py, docs/data.md).", features=FEATURES, homepage=HOMEPAGE,
        metadata=tfds.core.MetadataDict(), disable_shuffling=self.disable_shuffling)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared": nothing
  # is downloaded here, and `run.py prepare` prints its own summary.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    self.info.metadata.update({"dataset": self.DATASET, "skipped": {}, "prompts": {}})
    items = self._split_items(str(dl_manager.manual_dir))
    return {split: self._generate_examples(split, gen) for split, gen in items.items()}

  def _read(self, src: str) -> list[readers.ImageTask]:
    return readers.READERS[self.DATASET](src)

  def _split_items(self, src: str) -> dict[str, Iterator[records.Record]]:
    if os.path.isfile(os.path.join(src, records.META_FILE)):  # the old prepared format: convert it
      meta = records.read_meta(src)
      if meta.get("dataset") != self.DATASET:
        raise ValueError(f"{src} holds dataset {meta.get('dataset')!r}, not {self.DATASET!r}")
      self.info.metadata["converted_from"] = os.path.abspath(src)
      self.info.metadata["skipped"] = dict(meta.get("skipped", {}))
      return {split: iter(records.read_records(src, split)) for split in sorted(meta.get("splits", {}))}
    tasks = self._read(src)
    if not tasks:
      raise ValueError(f"{self.DATASET}: found no images to convert under {src}")
    by_split: dict[str, list[readers.ImageTask]] = collections.defaultdict(list)
    for t in tasks:
      by_split[t.split].append(t)
    self.info.metadata["src"] = os.path.abspath(src)
    return {split: self._from_tasks(ts) for split, ts in sorted(by_split.items())}

  def _from_tasks(self, tasks: list[readers.ImageTask]) -> Iterator[records.Record]:
    skipped = collections.Counter()
    try:
      for _, rec in readers.task_records(tasks, skipped):
        yield rec
    finally:
      total = collections.Counter(self.info.metadata["skipped"])
      total.update(skipped)
      self.info.metadata["skipped"] = dict(sorted(total.items()))

  def _generate_examples(self, split: str, recs: Iterator[records.Record]):
    prompts = 0
    for i, rec in enumerate(recs):
      prompts += len(rec.entries)
      # The key only has to be unique in the split; the index keeps it so for any image id.
      yield f"{i:09d}-{rec.image_id}", record_to_example(rec)
    self.info.metadata["prompts"][split] = prompts


_MANUAL = "The raw download of {dataset} in the layout of docs/data.md#2-raw-datasets (`run.py prepare --src`)."


def _make(dataset: str) -> type:
  cls = type(builder_name(dataset).title().replace("_", ""), (EvfBuilder,), {
      "name": builder_name(dataset), "DATASET": dataset, "__module__": __name__,
      "MANUAL_DOWNLOAD_INSTRUCTIONS": _MANUAL.format(dataset=dataset),
      "__doc__": f"{dataset} (data_pipelines/readers.py) as a TFDS dataset."})
  return cls


class Synthetic(EvfBuilder):
  """The generated dataset (data_pipelines/synthetic.py): no manual dir; size and seed are builder arguments,
  kept in the dataset's metadata."""

  name = "synthetic"
  DATASET = "synthetic"

  def __init__(self, *, num_train: int = 2000, num_eval: int = 200, seed: int = 0, **kwargs):
    self.num_train, self.num_eval, self.seed = num_train, num_eval, seed
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.metadata.update({"dataset": "synthetic", "seed": self.seed, "skipped": {}, "prompts": {}})
    return {split: self._generate_examples(split, self._examples(split, n))
            for split, n in (("train", self.num_train), ("val", self.num_eval))}

  def _examples(self, split: str, n: int) -> Iterator[records.Record]:
    # Rasterising (numpy) and PNG encoding release the GIL: two threads generate the set ~1.5x faster, in order.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      yield from pool.map(functools.partial(synthetic.make_example, self.seed, split), range(n))


class _Custom(EvfBuilder, skip_registration=True):
  """A dataset of the user's own (readers.read_custom), under the name the user gave it."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Your own data: {readers.CUSTOM_LAYOUT}."

  def _read(self, src: str) -> list[readers.ImageTask]:
    return readers.read_custom(src)

  def _split_generators(self, dl_manager):
    splits = super()._split_generators(dl_manager)
    self.info.metadata["format"] = readers.CUSTOM
    return splits


CUSTOM_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a TFDS dataset name; custom_name_problem says the rest


def custom_builder(name: str) -> type:
  """The builder of a custom dataset called `name` (check it with `custom_name_problem` first). Not registered
  with TFDS: datasets are read back by name from their files, whatever the process."""
  return types.new_class(name.title().replace("_", ""), (_Custom,), {"skip_registration": True}, lambda ns: ns.update(
      name=name, DATASET=name, __module__=__name__, __doc__=f"{name}: a dataset of your own (readers.read_custom)."))


def custom_name_problem(name: str) -> str | None:
  """Why `name` cannot name a custom dataset, or None: it must be a TFDS name (lowercase letters, digits and _,
  starting with a letter) that neither our datasets nor TFDS's catalogue use, since datasets are found by name."""
  if not CUSTOM_NAME.fullmatch(name):
    return "use lowercase letters, digits and _, starting with a letter"
  if len(name) > 64:  # it names a folder, and its shard files start with it
    return f"{len(name)} characters; use at most 64"
  ours = {readers.CUSTOM, *BUILDERS, *(builder_name(d) for d in BUILDERS)}
  if name in ours:
    return "that is one of the datasets run.py prepare builds itself"
  if name in tfds.list_builders(with_community_datasets=False):
    return "a dataset of TFDS's catalogue has that name, and TFDS would read it as that one"
  return None


BUILDERS: dict[str, type] = {**{d: _make(d) for d in sorted(readers.READERS)}, "synthetic": Synthetic}


def builder_class(dataset: str) -> type | None:
  return BUILDERS.get(dataset)
