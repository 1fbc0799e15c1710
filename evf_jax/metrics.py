"""Referring-segmentation metrics, exactly as EVF-SAM's eval.py computes them (docs/data.md#5-evaluation-protocol).

Per sentence j: prediction = logits > 0 at the original image resolution, I_j = |pred & gt|,
U_j = |pred | gt|. Over a split:
  cIoU = sum_j I_j / (sum_j U_j + 1e-10)                  (cumulative)
  gIoU = mean_j I_j / (U_j + 1e-10), with U_j = 0 -> 1     (per sentence; empty GT and empty prediction
                                                            is a correct "no object")
The device computes I_j and U_j as integers; the host accumulates them exactly (Python ints) and sums
per-sentence IoUs with math.fsum, so the result does not depend on batch size, device count or order.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

EPS = 1e-10  # the reference's epsilon, for both metrics


def intersection_union(logits, gt, region=None):
  """(..., H, W) logits and {0,1} ground truth -> (I, U) int32 (...) on device (jnp).

  region: optional bool (..., H, W) (broadcastable) of pixels that exist; padding outside it is ignored.
  """
  pred = logits > 0
  g = gt > 0
  if region is not None:
    pred, g = pred & region, g & region
  inter = jnp.sum(pred & g, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(pred | g, axis=(-2, -1), dtype=jnp.int32)
  return inter, union


def sentence_iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
  """Per-sentence IoU (float64) with the reference's no-object rule: U = 0 scores 1."""
  inter = np.asarray(inter, np.float64)
  union = np.asarray(union, np.float64)
  return np.where(union == 0, 1.0, inter / (union + EPS))


class IoUAccumulator:
  """Host-side totals of a split: exact integer I/U sums and an exactly rounded sum of sentence IoUs."""

  def __init__(self):
    self.sentences = 0
    self.total_inter = 0
    self.total_union = 0
    self.empty_union = 0
    self._ious: list[float] = []

  def add(self, inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Adds valid sentences' (I, U) (1-D); returns their IoUs."""
    inter = np.asarray(inter, np.int64).ravel()
    union = np.asarray(union, np.int64).ravel()
    if np.any(inter > union) or np.any(inter < 0):
      raise ValueError("intersection must lie in [0, union]")
    ious = sentence_iou(inter, union)
    self.sentences += inter.size
    self.total_inter += int(inter.sum())
    self.total_union += int(union.sum())
    self.empty_union += int((union == 0).sum())
    self._ious.extend(ious.tolist())
    return ious

  @property
  def iou_sum(self) -> float:
    """The exactly rounded sum of the sentence IoUs."""
    return math.fsum(self._ious)

  @property
  def giou(self) -> Optional[float]:
    return self.iou_sum / self.sentences if self.sentences else None

  @property
  def ciou(self) -> Optional[float]:
    return self.total_inter / (self.total_union + EPS) if self.sentences else None

  def result(self) -> dict:
    return {"giou": self.giou, "ciou": self.ciou, "sentences": self.sentences,
            "total_intersection": self.total_inter, "total_union": self.total_union,
            "empty_union_sentences": self.empty_union}
