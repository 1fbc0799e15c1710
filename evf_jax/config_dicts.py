"""Plain-data round trips of the frozen config dataclasses that converted checkpoints store as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
  """The fields as JSON-ready values (tuples become lists)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
  """`cls(**d)`, refusing keys that are not fields of `cls` (a config from another version or model)."""
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
  return cls(**dict(d))
