"""Which parameters are trained: a list of regular expressions over `/`-joined parameter paths
(`sam/image_encoder/blocks_3/attn/qkv/kernel`). A parameter is trained when any pattern matches its whole path;
the rest are frozen: kept out of the optimizer, never differentiated (so a frozen SAM image encoder builds no
backward pass and holds no optimizer state).

Tensors the PyTorch originals keep as buffers are parameters here (the checkpoints store them) but are never
trained, whatever the patterns say: SAM's random spatial frequencies are fixed in SAM's own training.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util

SEP = "/"
# Buffers in the originals: frozen even under `.*` (paths as `paths` writes them).
BUFFERS = (re.compile(r"(.*/)?pe_layer/positional_encoding_gaussian_matrix"),)


def is_buffer(path: str) -> bool:
  return any(b.fullmatch(path) for b in BUFFERS)


def paths(tree: Any) -> list[str]:
  return [SEP.join(k) for k in traverse_util.flatten_dict(tree)]


def split(params: Any, trainable: Sequence[str]) -> tuple[dict, dict]:
  """params -> (trained, frozen): two nested dicts with the same layout and disjoint leaves."""
  compiled = [re.compile(p) for p in trainable]
  flat = traverse_util.flatten_dict(params)
  train, frozen = {}, {}
  for key, value in flat.items():
    path = SEP.join(key)
    trained = not is_buffer(path) and any(c.fullmatch(path) for c in compiled)
    (train if trained else frozen)[key] = value
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trained: Any, frozen: Any) -> dict:
  """The inverse of `split`."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trained))
  return traverse_util.unflatten_dict(flat)


def check_patterns(all_paths: Sequence[str], trainable: Sequence[str]) -> list[str]:
  """The patterns that match no trainable parameter (a typo in a config would otherwise freeze silently)."""
  all_paths = [p for p in all_paths if not is_buffer(p)]
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
  """True when no parameter of SAM's (or SAM-2's) image encoder is trained (it then runs without gradients)."""
  return not any(path.startswith("sam/image_encoder/") for path in paths(trained))


def decoder_trained(trained: Any) -> bool:
  """True when some parameter of SAM's (or SAM-2's) mask decoder is trained."""
  return any(path.startswith(("sam/mask_decoder/", "sam/sam_mask_decoder/")) for path in paths(trained))
