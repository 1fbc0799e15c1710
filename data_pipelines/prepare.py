"""`run.py prepare`: raw download (or the synthetic generator) -> a TFDS dataset in ArrayRecord format.

`build` runs the dataset's TFDS builder (data_pipelines/tfds_builders) with the raw download as its manual
dir, into DATA_DIR/NAME/VERSION. TFDS writes into a temporary folder and renames it when everything
succeeded, so an interrupted run never leaves something that looks like a finished dataset. An existing
DATA_DIR/NAME/VERSION is refused, and so is a DATA_DIR/NAME in the old format (readers would keep preferring it).
Images that are missing, corrupt, or disagree with their annotations are skipped and counted (the dataset's
metadata.json "skipped"); a split left with no image stops the build, naming its counts.

`prepare` writes the old records.py format into one directory; it is deprecated and kept for one release.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable

import tensorflow_datasets as tfds
from tqdm import tqdm

from data_pipelines import readers, records, sources, synthetic, tfds_builders
from evf_jax import storage
from evf_jax.errors import UserError

DATASETS = sorted(readers.READERS) + [readers.CUSTOM, "synthetic"]


def _remove_empty_parents(path: str, stop: str) -> None:
  stop = os.path.abspath(stop)
  path = os.path.dirname(os.path.abspath(path))
  while path.startswith(stop + os.sep) and os.path.isdir(path) and not os.listdir(path):
    os.rmdir(path)
    path = os.path.dirname(path)


def _check_local_dir(path: str, flag: str) -> None:
  """One line now, rather than a traceback from TFDS or os later: a URL, a file, a path under a file, read-only."""
  if path and storage.is_url(path):
    raise UserError(f"{flag} {path}: prepare writes local directories; build locally, then copy the result")
  storage.check_output_dir(path, flag)


def _remove_stale_incomplete(name_dir: str, version: str) -> None:
  """TFDS builds in NAME/incomplete.XXXXXX_VERSION and renames it when done, so such a folder is never a finished
  dataset: it is what a killed run left behind, and nothing else would ever remove it."""
  if not os.path.isdir(name_dir):
    return
  stale = re.compile(r"incomplete\.[A-Za-z0-9]+_" + re.escape(version))
  for entry in os.listdir(name_dir):
    if stale.fullmatch(entry) and os.path.isdir(os.path.join(name_dir, entry)):
      shutil.rmtree(os.path.join(name_dir, entry))


def build(dataset: str, data_dir: str, src: str | None = None, *, name: str | None = None, num_train: int = 2000,
          num_eval: int = 200, seed: int = 0, progress: bool = True) -> dict:
  """Builds one dataset as TFDS ArrayRecord into `data_dir`; returns a summary (also in the dataset's
  metadata.json): {"dataset", "path", "splits": {split: {"images", "prompts", "shards"}}, "skipped"}.
  `src` is the raw download (docs/data.md#2-raw-datasets) or a directory in the old prepared format; for
  dataset "custom", the user's own data (readers.CUSTOM_LAYOUT), built as the dataset `name`."""
  _check_local_dir(data_dir, "--data_dir")
  cls = _builder_class(dataset, name)
  name_dir = os.path.join(os.path.abspath(data_dir), cls.name)
  if os.path.exists(name_dir) and not os.path.isdir(name_dir):
    raise UserError(f"{name_dir} is a file; choose another --data_dir or remove it")
  if sources.is_legacy(name_dir):  # sources.locate prefers it: a TFDS dataset inside would never be read
    how = ("build it into another --data_dir" if dataset in ("synthetic", readers.CUSTOM) else  # never converted
           f"convert it into another --data_dir: `run.py prepare --dataset {dataset} --src {name_dir} --data_dir "
           "OTHER_DIR`")
    raise UserError(f"{name_dir} holds a dataset in the old prepared format ({records.META_FILE}), which would "
                    f"still be read instead of the new one; {how}")
  if dataset == "synthetic":
    if src:
      raise UserError("--src is not used with --dataset synthetic (it is generated, see --num-train/--seed)")
    builder = cls(data_dir=data_dir, file_format="array_record", num_train=num_train, num_eval=num_eval, seed=seed)
  else:
    if not src:
      raise UserError(f"--src is required for --dataset {dataset}")
    if not os.path.isdir(src):
      raise UserError(f"--src {src} is not a directory")
    builder = cls(data_dir=data_dir, file_format="array_record")
  path = str(builder.data_dir)
  if os.path.exists(path):
    raise UserError(f"{path} already exists; choose another --data_dir or remove it")
  _remove_stale_incomplete(os.path.dirname(path), os.path.basename(path))
  tfds.display_progress_bar(progress)
  with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keeps data_dir free of downloads/
    try:
      builder.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
          manual_dir=os.path.abspath(src) if src else None))
    except readers.EmptySplitError as e:  # a split whose every image was skipped, with that split's counts
      raise UserError(f"{dataset}: {e}") from None
    except ValueError as e:  # the readers' "nothing found" and a converted dataset of another name
      raise UserError(str(e)) from None
    except AssertionError as e:  # TFDS refuses an empty split, e.g. one whose every image was skipped
      raise UserError(f"{dataset}: {e}") from None
    finally:
      _remove_empty_parents(path, stop=data_dir)  # TFDS removes its temporary folder, not NAME/ around it
  meta = builder.info.metadata
  splits = {name: {"images": int(info.num_examples), "prompts": int(meta["prompts"].get(name, 0)),
                   "shards": len(info.shard_lengths)} for name, info in sorted(builder.info.splits.items())}
  return {"dataset": meta["dataset"], "path": path, "splits": splits, "skipped": dict(meta.get("skipped", {}))}


def _builder_class(dataset: str, name: str | None) -> type:
  """The TFDS builder of `dataset`; for "custom", one named `name` (checked: training mixtures and evaluation
  splits find the dataset by it)."""
  if dataset == readers.CUSTOM:
    if not name:
      raise UserError("--dataset custom needs --name NAME: the name training mixtures and evaluation splits "
                      "(NAME|SPLIT) will use")
    problem = tfds_builders.custom_name_problem(name)
    if problem:
      raise UserError(f"--name {name}: {problem}")
    return tfds_builders.custom_builder(name)
  if name:
    raise UserError(f"--name is for --dataset custom only ({dataset} has its own name)")
  cls = tfds_builders.builder_class(dataset)
  if cls is None:
    raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
  return cls


def _check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"{out} already exists and is not empty; choose another --out or remove it")


records_from_tasks = readers.task_records  # the old name


def write_dataset(out: str, dataset: str, items: Iterable[tuple[str, records.Record]], total: int | None,
                  records_per_shard: int = 2000, extra_meta: dict | None = None,
                  skipped: collections.Counter | None = None, progress: bool = True) -> dict:
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


def prepare(dataset: str, out: str, src: str | None = None, *, num_train: int = 2000, num_eval: int = 200,
            seed: int = 0, records_per_shard: int = 2000, progress: bool = True) -> dict:
  """Deprecated (one release): converts one dataset into the old records.py format in OUT; returns the summary
  that is also stored in OUT/meta.json. `build` writes the TFDS dataset that replaces it."""
  if dataset == readers.CUSTOM:
    raise UserError("--dataset custom builds a TFDS dataset only: give --data_dir, not the deprecated --out")
  warnings.warn("this writes the old prepared format, read for one more release; build a TFDS dataset instead "
                "(`run.py prepare --data_dir`, prepare.build)", sources.OldFormatWarning, stacklevel=2)
  _check_local_dir(out, "--out")
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
  try:
    return write_dataset(out, dataset, records_from_tasks(tasks, skipped), len(tasks), records_per_shard,
                         {"src": os.path.abspath(src)}, skipped, progress)
  except readers.EmptySplitError as e:  # a split whose every image was skipped: no dataset without it
    shutil.rmtree(out.rstrip("/") + ".partial", ignore_errors=True)
    raise UserError(f"{dataset}: {e}") from None
