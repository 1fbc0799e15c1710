"""Evaluation split names and where their data lives.

Splits are named as EVF-SAM's eval.py names them, "DATASET|SPLITBY|SPLIT": refcoco|unc|val,
refcoco|unc|testA, refcoco|unc|testB, refcoco+|unc|{val,testA,testB}, refcocog|umd|{val,test} (the eight
standard splits), plus refclef|unc|{val,testA,testB,testC}, grefcoco|unc|{val,testA,testB},
"synthetic|SPLIT", and "NAME|SPLIT" for a dataset of your own (`run.py prepare --dataset custom --name NAME`).
SPLIT may carry a TFDS slice: "refcoco|unc|val[:10%]".

DATA is a TFDS data_dir (or one dataset folder in it). The split is read from, in this order:
  DATA/NAME        the dataset built by `run.py prepare --dataset DATASET --data_dir DATA` (NAME: refcoco+ ->
                   refcocoplus), or an old prepared directory DATA/DATASET (deprecated);
  DATA/ref_coco/CONFIG   TFDS's own `ref_coco` (refcoco_unc, refcocoplus_unc, refcocog_umd, and the google
                   partitions refcoco|google|..., refcocog|google|...), where "val" is its "validation".
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from data_pipelines import sources
from data_pipelines.tfds_builders import CUSTOM_NAME, builder_name, prepare_command
from evf_jax.errors import UserError

STANDARD_SPLITS = ("refcoco|unc|val", "refcoco|unc|testA", "refcoco|unc|testB",
                   "refcoco+|unc|val", "refcoco+|unc|testA", "refcoco+|unc|testB",
                   "refcocog|umd|val", "refcocog|umd|test")
# splitBy of each refer dataset: the one partition `run.py prepare` reads (data_pipelines.readers).
REFER_SPLIT_BY = {"refclef": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
# Partitions TFDS's ref_coco also has (readable only from there).
REF_COCO_SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
REF_COCO_SPLITS = {"val": "validation"}  # our split name -> ref_coco's
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  name: str     # as the user wrote it, e.g. "refcoco|unc|val"
  dataset: str  # the prepared directory's dataset, e.g. "refcoco"
  split: str    # the split inside it, e.g. "val", "val[:10%]"; the source's own name once resolved
  split_by: str = ""  # the refer partition, e.g. "unc"

  @property
  def tag(self) -> str:
    """File-name form: refcoco_unc_val, refcoco+_unc_testA, synthetic_val."""
    return re.sub(r"[^\w+\-.]", "_", self.name.replace("|", "_"))


def _base(split: str) -> str:
  """"val[:10%]" -> "val"."""
  return split.split("[", 1)[0]


def parse_split(name: str) -> EvalSplit:
  parts = name.split("|")
  dataset, split_by = parts[0], ""
  if dataset == SYNTHETIC or (dataset not in REFER_SPLIT_BY and len(parts) == 2 and CUSTOM_NAME.fullmatch(dataset)):
    if len(parts) != 2:
      raise UserError(f"split {name!r}: the synthetic set is named 'synthetic|SPLIT', e.g. 'synthetic|val'")
    split = parts[1]
  elif dataset in REFER_SPLIT_BY:
    if len(parts) != 3:
      raise UserError(f"split {name!r}: expected DATASET|SPLITBY|SPLIT, e.g. 'refcoco|unc|val'")
    if parts[1] != REFER_SPLIT_BY[dataset] and parts[1] not in REF_COCO_SPLIT_BY.get(dataset, ()):
      raise UserError(f"split {name!r}: {dataset} is prepared from its {REFER_SPLIT_BY[dataset]!r} "
                      f"partition only (use '{dataset}|{REFER_SPLIT_BY[dataset]}|{parts[2]}')")
    split, split_by = parts[2], parts[1]
  else:
    known = ", ".join(sorted(REFER_SPLIT_BY) + [SYNTHETIC])
    raise UserError(f"split {name!r}: unknown dataset {dataset!r} (known: {known}; a dataset of your own is "
                    "'NAME|SPLIT')")
  if not split:
    raise UserError(f"split {name!r}: empty split name")
  if _base(split) == "train" and (dataset == SYNTHETIC or dataset in REFER_SPLIT_BY):  # custom texts: as written
    raise UserError(f"split {name!r}: train records keep raw sentences and are not an evaluation split")
  return EvalSplit(name, dataset, split, split_by)


def expand_splits(names: Sequence[str]) -> list[EvalSplit]:
  """Parses --split values in order, "standard" standing for the eight standard splits; no duplicates."""
  out: list[EvalSplit] = []
  for n in names:
    for m in (STANDARD_SPLITS if n == "standard" else (n,)):
      s = parse_split(m)
      if s not in out:
        out.append(s)
  return out


def _candidates(data: str, split: EvalSplit) -> list[str]:
  """Where `split` may live under DATA, in order of preference (module docstring)."""
  out = [data]
  if split.split_by in ("", REFER_SPLIT_BY.get(split.dataset)):
    out += [os.path.join(data, split.dataset), os.path.join(data, builder_name(split.dataset))]
  if split.dataset in REF_COCO_SPLIT_BY:
    config = f"{builder_name(split.dataset)}_{split.split_by}"
    out.append(os.path.join(data, sources.REF_COCO, config))
  return out


def resolve_data_dir(data: str, split: EvalSplit) -> tuple[EvalSplit, sources.Location, dict]:
  """The dataset holding `split` -> (the split as that source names it, its location, its description
  (`sources.describe`)). UserError if absent."""
  if not os.path.isdir(data):
    raise UserError(f"--data {data}: " + ("a file; expected the directory datasets were prepared into"
                                          if os.path.exists(data) else "no such directory"))
  found = None
  for path in _candidates(data, split):
    try:
      where = sources.locate(path)
    except FileNotFoundError:
      continue
    except ValueError as e:
      raise UserError(f"{split.name}: {e}") from None
    found = (path, where)  # the first is --data itself: one dataset, which must be this one (checked below)
    break
  if found is None:
    also = ", or build TFDS's ref_coco there" if split.dataset in REF_COCO_SPLIT_BY else ""
    raise UserError(f"{split.name}: no prepared dataset at {os.path.join(data, builder_name(split.dataset))} "
                    f"(build it with `{prepare_command(split.dataset, data)}`{also})")
  path, where = found
  try:
    meta = sources.describe(where)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: {e}") from None
  if meta.get("dataset") != split.dataset:
    raise UserError(f"{split.name}: {path} holds dataset {meta.get('dataset')!r}, not {split.dataset!r}")
  name = split.split
  if isinstance(where, sources.TfdsDataset) and where.builder == sources.REF_COCO:
    base = _base(name)
    name = REF_COCO_SPLITS.get(base, base) + name[len(base):]
  splits = meta.get("splits", {})
  if _base(name) not in splits:
    raise UserError(f"{split.name}: {path} has no split {_base(name)!r} "
                    f"(it has: {', '.join(sorted(splits)) or 'none'})")
  return dataclasses.replace(split, split=name), where, meta
