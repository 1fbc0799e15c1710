"""Plain-data round trips of the frozen config dataclasses that converted checkpoints store as JSON."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Iterable, Mapping, TypeVar

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
  """The fields as JSON-ready values (tuples become lists)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def refuse_unknown(name: str, d: Mapping[str, Any], known: Iterable[str]) -> None:
  """ValueError naming the keys of `d` outside `known` (e.g. what `to_dict()` writes): a config from another
  version or model, or a typo in a file edited by hand, which would otherwise be ignored and the model built
  without it."""
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise ValueError(f"unknown {name} fields: {unknown}")


def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
  """`cls(**d)`, refusing keys that are not fields of `cls`."""
  refuse_unknown(cls.__name__, d, (f.name for f in dataclasses.fields(cls)))
  return cls(**dict(d))


def check_repeated(d: Mapping[str, Any], config: Any, names: Iterable[str]) -> None:
  """ValueError if a value `d` repeats for its readers (e.g. hidden_size, which the BEiT-3 part decides) is not
  what `config` built from `d` has: an edit of the copy alone would otherwise be ignored."""
  for name in names:
    if name in d and (type(d[name]) is bool or d[name] != getattr(config, name)):
      raise ValueError(f"{name}={d[name]!r} does not fit the rest of the config, which gives {getattr(config, name)}")


# Integer fields that count or size something: 0 would build an empty or broken model. (window_size 0 is SAM's
# global attention; index tuples may hold 0.)
_AT_LEAST_ONE = re.compile(r"(size|dim|heads|depth|layers|positions|chans|d_model|rate)$")
_MAY_BE_ZERO = {"window_size"}


def _bad_scalar(name: str, value: Any, default: Any) -> str | None:
  """Why `value` cannot stand where the field's default is `default`, or None."""
  if isinstance(default, bool):
    return None if isinstance(value, bool) else f"expected a bool, got {value!r}"
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      return f"expected an int, got {value!r}"
    least = 1 if _AT_LEAST_ONE.search(name) and name not in _MAY_BE_ZERO else 0
    return None if value >= least else f"must be >= {least}, got {value}"
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
      return f"expected a finite number, got {value!r}"
    return None
  if isinstance(default, str):
    return None if isinstance(value, str) else f"expected a string, got {value!r}"
  return None


def check_values(config: Any) -> None:
  """ValueError naming the first field of the dataclass `config` whose value is not of its default's kind (a
  bool, an int >= 0 (>= 1 for sizes, widths and depths), a finite number, a string, or a list of such values of
  the default's length when that is fixed): a model_config.json or a training config edited by hand would
  otherwise fail deep inside the model with a traceback, or build a model of negative size."""
  for f in dataclasses.fields(config):
    if f.default is dataclasses.MISSING:
      continue
    value, default = getattr(config, f.name), f.default
    if isinstance(default, tuple):
      if not isinstance(value, (list, tuple)):
        raise ValueError(f"{f.name}: expected a list, got {value!r}")
      if "..." not in str(f.type) and len(value) != len(default):
        raise ValueError(f"{f.name}: expected {len(default)} values, got {len(value)}")
      for item in value:
        problem = _bad_scalar("", item, default[0]) if default else None
        if problem:
          raise ValueError(f"{f.name}: {problem}")
      continue
    problem = _bad_scalar(f.name, value, default)
    if problem:
      raise ValueError(f"{f.name}: {problem}")
