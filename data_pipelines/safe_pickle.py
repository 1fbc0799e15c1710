"""Loading the REFER `refs(*).p` pickles without letting them run code.

A pickle can name any importable callable (GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcodes all go through
`find_class`) and call it (REDUCE), so a crafted file can run `os.system`. The refs files hold only lists,
dicts, strings and numbers, which unpickle without any global; `find_class` therefore refuses everything.

The refer pickles were written by Python 2 (protocol 2): their strings are py2 `str`, i.e. bytes. They are read
with encoding="bytes" and every bytes object is then decoded as UTF-8 (latin-1 as a last resort), so non-ASCII
`raw` sentences come out right instead of as latin-1 mojibake.
"""

from __future__ import annotations

import io
import pickle
from typing import Any


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle wanted to import something; refused."""


class _NoGlobalsUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):  # noqa: D102
    raise UnsafePickleError(f"refusing to load global {module}.{name}: only plain data is allowed in this pickle")

  def persistent_load(self, pid):  # noqa: D102
    raise UnsafePickleError("refusing a persistent id: only plain data is allowed in this pickle")


def _to_text(obj: Any) -> Any:
  if isinstance(obj, bytes):
    try:
      return obj.decode("utf-8")
    except UnicodeDecodeError:
      return obj.decode("latin-1")
  if isinstance(obj, list):
    return [_to_text(x) for x in obj]
  if isinstance(obj, tuple):
    return tuple(_to_text(x) for x in obj)
  if isinstance(obj, dict):
    return {_to_text(k): _to_text(v) for k, v in obj.items()}
  if isinstance(obj, (set, frozenset)):
    return type(obj)(_to_text(x) for x in obj)
  return obj


def loads(data: bytes) -> Any:
  """Unpickles plain data (containers, str, bytes, numbers, bool, None); raises UnsafePickleError otherwise."""
  return _to_text(_NoGlobalsUnpickler(io.BytesIO(data), encoding="bytes").load())


def load(path: str) -> Any:
  with open(path, "rb") as f:
    return loads(f.read())
