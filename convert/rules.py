"""The rule engine that maps a PyTorch state dict onto a Flax parameter tree.

A model's conversion is a table of `Rule(pattern, target, transform)`: `pattern` is a regex that must
match a whole source key, `target` is the Flax path ('/'-separated, with `\\1`-style group references),
and `transform` names one of `TRANSFORMS`. The target tree comes from `jax.eval_shape(model.init)`,
so the converter knows every shape the model expects.

The engine is strict: it collects every problem (a source key no rule matches, a key two rules match,
a target the model lacks, a target no source fills, a shape mismatch) and raises ONE
`ConversionError` listing them all, so a user fixes a bad checkpoint in one go.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from evf_jax.errors import UserError

RULES_VERSION = 1


def _t_linear(a):  # torch Linear (out, in) -> flax Dense (in, out)
  return a.T


def _t_conv2d(a):  # torch Conv2d (out, in, kh, kw) -> flax Conv (kh, kw, in, out)
  return a.transpose(2, 3, 1, 0)


def _t_conv2d_inv(a):
  return a.transpose(3, 2, 0, 1)


# torch ConvTranspose2d weight is (in, out, kh, kw). Used with flax `ConvTranspose(transpose_kernel=True)`,
# which takes (kh, kw, out, in) and flips the kernel spatially itself, the same permutation as Conv2d works.

# name -> (forward: torch layout -> flax layout, inverse)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda a: a, lambda a: a),
    "linear": (_t_linear, _t_linear),
    "conv2d": (_t_conv2d, _t_conv2d_inv),
    "conv_transpose2d": (_t_conv2d, _t_conv2d_inv),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str
  target: str
  transform: str = "identity"

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f"unknown transform {self.transform!r} in rule {self.pattern!r}")


class ConversionError(UserError, ValueError):
  """Raised once with every problem found in a conversion."""

  def __init__(self, problems: Sequence[str], what: str = "checkpoint"):
    self.problems = list(problems)
    if len(self.problems) == 1:
      super().__init__(f"cannot convert {what}: {self.problems[0]}")
    else:
      head = f"cannot convert {what}: {len(self.problems)} problem(s)"
      super().__init__(head + "\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass
class ConversionResult:
  params: dict[str, Any]                 # nested flax params
  mapping: dict[str, tuple[str, str]]    # flax path -> (source key, transform name)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _flat(tree: Mapping[str, Any]) -> Mapping[str, Any]:
  """A params tree nested or already flat ('/'-joined) -> flat."""
  return tree if all(isinstance(k, str) and not isinstance(v, Mapping) for k, v in tree.items()) else flatten(tree)


def _is_float(dt) -> bool:
  return np.dtype(dt).kind in "fV" or "bfloat16" in str(dt)


def _shape_of(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def convert(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule],
            target: Mapping[str, Any], *, ignore: Iterable[str] = (),
            dtype: Optional[Any] = None, what: str = "checkpoint") -> ConversionResult:
  """Converts `state_dict` (source key -> array, torch layout) with `rules` onto `target`.

  Args:
    state_dict: flat source tensors (numpy arrays, any float dtype).
    rules: the model's rule table.
    target: the model's parameter tree, nested or flat ('/'-joined), of arrays or
      ShapeDtypeStructs (e.g. the unboxed output of `jax.eval_shape(model.init, ...)`).
    ignore: regexes of source keys to drop on purpose (e.g. buffers the Flax model recomputes).
    dtype: cast floating tensors to this dtype; default: the target leaf's dtype.
    what: a name for the checkpoint in error messages.
  """
  flat_target = _flat(target)
  compiled = [(re.compile(r.pattern), r) for r in rules]
  ignore_res = [re.compile(p) for p in ignore]
  problems: list[str] = []
  out: dict[str, np.ndarray] = {}
  mapping: dict[str, tuple[str, str]] = {}
  reported: set[str] = set()  # targets already named in a problem, not to be listed again as missing

  for key in sorted(state_dict):
    matches = [(m, r) for rx, r in compiled if (m := rx.fullmatch(key))]
    if not matches:
      if not any(rx.fullmatch(key) for rx in ignore_res):
        problems.append(f"unexpected source key {key!r} {_shape_of(state_dict[key])}: no rule matches it")
      continue
    if len(matches) > 1:
      problems.append(f"source key {key!r} matches {len(matches)} rules: "
                      + ", ".join(repr(r.pattern) for _, r in matches))
      continue
    m, rule = matches[0]
    dest = m.expand(rule.target)
    if dest not in flat_target:
      problems.append(f"source key {key!r} maps to {dest!r}, which the model does not have")
      continue
    if dest in mapping:
      problems.append(f"target {dest!r} is filled twice: by {mapping[dest][0]!r} and {key!r}")
      continue
    value = TRANSFORMS[rule.transform][0](np.asarray(state_dict[key]))
    want = _shape_of(flat_target[dest])
    if tuple(value.shape) != want:
      reported.add(dest)
      problems.append(f"shape mismatch for {key!r} -> {dest!r}: checkpoint has "
                      f"{tuple(np.asarray(state_dict[key]).shape)} (as {tuple(value.shape)} after "
                      f"{rule.transform}), model expects {want}")
      continue
    leaf_dtype = getattr(flat_target[dest], "dtype", None)
    if leaf_dtype is not None and _is_float(value.dtype) != _is_float(leaf_dtype):
      reported.add(dest)
      problems.append(f"dtype mismatch for {key!r}: checkpoint has {value.dtype}, model expects {leaf_dtype}")
      continue
    if _is_float(value.dtype):
      value = value.astype(dtype if dtype is not None else (leaf_dtype or value.dtype))
    out[dest] = np.ascontiguousarray(value)
    mapping[dest] = (key, rule.transform)

  for dest in sorted(set(flat_target) - set(out)):
    if dest not in reported:
      problems.append(f"missing: model parameter {dest!r} {_shape_of(flat_target[dest])} "
                      "is not filled by any source key")
  if problems:
    raise ConversionError(problems, what)
  return ConversionResult(params=unflatten(out), mapping=mapping)


def _pattern_parts(pattern: str) -> list[Any]:
  """A rule's pattern as literal text (str) and capture groups ((number, regex)); a non-capturing group
  `(?:a|b)` stands for its first alternative, the name written back."""
  parts: list[Any] = []
  text: list[str] = []
  i, groups = 0, 0
  while i < len(pattern):
    c = pattern[i]
    if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
      text.append(pattern[i + 1])
      i += 2
    elif c == "(":
      end = pattern.find(")", i)
      inner = pattern[i + 1:end]
      if end < 0 or "(" in inner:
        raise ValueError(f"rule pattern {pattern!r} cannot be written back (nested or open group)")
      if inner.startswith("?:"):
        first = inner[2:].split("|")[0]
        if not re.fullmatch(r"\w+", first):
          raise ValueError(f"rule pattern {pattern!r}: a non-capturing group's first alternative must be a name")
        text.append(first)
      else:
        groups += 1
        parts.extend(["".join(text), (groups, inner)])
        text = []
      i = end + 1
    elif c in "\\.^$*+?{}[]|)":
      raise ValueError(f"rule pattern {pattern!r} cannot be written back ({c!r} outside a group)")
    else:
      text.append(c)
      i += 1
  parts.append("".join(text))
  return [p for p in parts if p != ""]


@dataclasses.dataclass(frozen=True)
class _Inverse:
  """One rule read backwards: `target` matches flax paths, `source` rebuilds the key from its groups."""
  target: re.Pattern
  source: list[Any]
  rule: Rule

  @classmethod
  def of(cls, rule: Rule) -> "_Inverse":
    source = _pattern_parts(rule.pattern)
    groups = dict(p for p in source if isinstance(p, tuple))
    regex, seen = [], set()
    for k, piece in enumerate(re.split(r"\\(\d)", rule.target)):
      if k % 2 == 0:
        regex.append(re.escape(piece))
      else:
        n = int(piece)
        regex.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>{groups[n]})")
        seen.add(n)
    if seen != set(groups):
      raise ValueError(f"rule {rule.pattern!r} -> {rule.target!r}: a group the target does not use")
    return cls(re.compile("".join(regex)), [p if isinstance(p, str) else p[0] for p in source], rule)

  def source_key(self, dest: str) -> Optional[str]:
    m = self.target.fullmatch(dest)
    if m is None:
      return None
    key = "".join(p if isinstance(p, str) else m.group(f"g{p}") for p in self.source)
    fwd = re.fullmatch(self.rule.pattern, key)  # the key must convert back to `dest` through the same rule
    return key if fwd is not None and fwd.expand(self.rule.target) == dest else None


def source_mapping(target: Mapping[str, Any], rules: Sequence[Rule],
                   what: str = "model") -> dict[str, tuple[str, str]]:
  """`convert`'s mapping (flax path -> (source key, transform)) computed from the rules alone, for writing a
  model's params back in the source layout (`revert`). Every parameter must be written by exactly one rule."""
  flat = _flat(target)
  inverses = [_Inverse.of(r) for r in rules]
  mapping: dict[str, tuple[str, str]] = {}
  problems: list[str] = []
  for dest in sorted(flat):
    found = {(key, inv.rule.transform) for inv in inverses if (key := inv.source_key(dest)) is not None}
    if len(found) != 1:
      keys = ", ".join(sorted(k for k, _ in found))
      problems.append(f"parameter {dest!r}: " + (f"{len(found)} source keys ({keys})" if found else "no rule writes it"))
      continue
    mapping[dest] = found.pop()
  counts = collections.Counter(key for key, _ in mapping.values())
  problems += [f"source key {k!r} written {n} times" for k, n in sorted(counts.items()) if n > 1]
  if problems:
    raise ConversionError(problems, what)
  return mapping


def revert(params: Mapping[str, Any], mapping: Mapping[str, tuple[str, str]]) -> dict[str, np.ndarray]:
  """The inverse of `convert`: Flax params back to a torch-layout flat state dict."""
  flat = flatten(params)
  return {src: TRANSFORMS[t][1](np.asarray(flat[dest])) for dest, (src, t) in mapping.items()}


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Keeps the keys under `prefix` (e.g. 'visual_model.'), without it."""
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
