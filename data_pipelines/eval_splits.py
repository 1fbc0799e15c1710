"""Evaluation split names and where their prepared data lives.

Splits are named as EVF-SAM's eval.py names them, "DATASET|SPLITBY|SPLIT": refcoco|unc|val,
refcoco|unc|testA, refcoco|unc|testB, refcoco+|unc|{val,testA,testB}, refcocog|umd|{val,test} (the eight
standard splits), plus refclef|unc|{val,testA,testB,testC}, grefcoco|unc|{val,testA,testB}, and
"synthetic|SPLIT". SPLIT is the split inside DATA/DATASET, a directory written by
`run.py prepare --dataset DATASET --out DATA/DATASET` (DATA may also be one prepared directory itself).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from data_pipelines import records
from evf_jax.errors import UserError

STANDARD_SPLITS = ("refcoco|unc|val", "refcoco|unc|testA", "refcoco|unc|testB",
                   "refcoco+|unc|val", "refcoco+|unc|testA", "refcoco+|unc|testB",
                   "refcocog|umd|val", "refcocog|umd|test")
# splitBy of each refer dataset: the one partition `run.py prepare` reads (data_pipelines.readers).
REFER_SPLIT_BY = {"refclef": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  name: str     # as the user wrote it, e.g. "refcoco|unc|val"
  dataset: str  # the prepared directory's dataset, e.g. "refcoco"
  split: str    # the split inside it, e.g. "val"

  @property
  def tag(self) -> str:
    """File-name form: refcoco_unc_val, refcoco+_unc_testA, synthetic_val."""
    return self.name.replace("|", "_")


def parse_split(name: str) -> EvalSplit:
  parts = name.split("|")
  dataset = parts[0]
  if dataset == SYNTHETIC:
    if len(parts) != 2:
      raise UserError(f"split {name!r}: the synthetic set is named 'synthetic|SPLIT', e.g. 'synthetic|val'")
    split = parts[1]
  elif dataset in REFER_SPLIT_BY:
    if len(parts) != 3:
      raise UserError(f"split {name!r}: expected DATASET|SPLITBY|SPLIT, e.g. 'refcoco|unc|val'")
    if parts[1] != REFER_SPLIT_BY[dataset]:
      raise UserError(f"split {name!r}: {dataset} is prepared from its {REFER_SPLIT_BY[dataset]!r} "
                      f"partition only (use '{dataset}|{REFER_SPLIT_BY[dataset]}|{parts[2]}')")
    split = parts[2]
  else:
    known = ", ".join(sorted(REFER_SPLIT_BY) + [SYNTHETIC])
    raise UserError(f"split {name!r}: unknown dataset {dataset!r} (known: {known})")
  if not split:
    raise UserError(f"split {name!r}: empty split name")
  if split == "train":
    raise UserError(f"split {name!r}: train records keep raw sentences and are not an evaluation split")
  return EvalSplit(name, dataset, split)


def expand_splits(names: Sequence[str]) -> list[EvalSplit]:
  """Parses --split values in order, "standard" standing for the eight standard splits; no duplicates."""
  out: list[EvalSplit] = []
  for n in names:
    for m in (STANDARD_SPLITS if n == "standard" else (n,)):
      s = parse_split(m)
      if s not in out:
        out.append(s)
  return out


def resolve_data_dir(data: str, split: EvalSplit) -> tuple[str, dict]:
  """The prepared directory holding `split` -> (its path, its meta.json). UserError if absent."""
  if not os.path.isdir(data):
    raise UserError(f"--data {data}: no such directory")
  if os.path.isfile(os.path.join(data, records.META_FILE)):
    directory = data  # --data is one prepared dataset
  else:
    directory = os.path.join(data, split.dataset)
    if not os.path.isfile(os.path.join(directory, records.META_FILE)):
      raise UserError(f"{split.name}: no prepared dataset at {directory} (write it with `run.py prepare "
                      f"--dataset {split.dataset} --out {directory}`)")
  try:
    meta = records.read_meta(directory)
  except (OSError, ValueError) as e:
    raise UserError(f"{directory}: {e}") from None
  if meta.get("dataset") != split.dataset:
    raise UserError(f"{split.name}: {directory} holds dataset {meta.get('dataset')!r}, not {split.dataset!r}")
  splits = meta.get("splits", {})
  if split.split not in splits:
    raise UserError(f"{split.name}: {directory} has no split {split.split!r} "
                    f"(it has: {', '.join(sorted(splits)) or 'none'})")
  return directory, meta
