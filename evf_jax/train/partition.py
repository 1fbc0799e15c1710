"""Which parameters are trained: a list of regular expressions over `/`-joined parameter paths
(`sam/image_encoder/blocks_3/attn/qkv/kernel`). A parameter is trained when any pattern matches its whole path;
the rest are frozen: kept out of the optimizer, never differentiated (so a frozen SAM image encoder builds no
backward pass and holds no optimizer state).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util

SEP = "/"


def paths(tree: Any) -> list[str]:
  return [SEP.join(k) for k in traverse_util.flatten_dict(tree)]


def split(params: Any, trainable: Sequence[str]) -> tuple[dict, dict]:
  """params -> (trained, frozen): two nested dicts with the same layout and disjoint leaves."""
  compiled = [re.compile(p) for p in trainable]
  flat = traverse_util.flatten_dict(params)
  train, frozen = {}, {}
  for key, value in flat.items():
    (train if any(c.fullmatch(SEP.join(key)) for c in compiled) else frozen)[key] = value
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trained: Any, frozen: Any) -> dict:
  """The inverse of `split`."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trained))
  return traverse_util.unflatten_dict(flat)


def check_patterns(all_paths: Sequence[str], trainable: Sequence[str]) -> list[str]:
  """The patterns that match no parameter (a typo in a config would otherwise freeze silently)."""
  bad = []
  for p in trainable:
    try:
      c = re.compile(p)
    except re.error as e:
      bad.append(f"{p!r} ({e})")
      continue
    if not any(c.fullmatch(path) for path in all_paths):
      bad.append(repr(p))
  return bad


def encoder_frozen(trained: Any) -> bool:
  """True when no parameter of SAM's image encoder is trained (it then runs without gradients)."""
  return not any(path.startswith("sam/image_encoder/") for path in paths(trained))
