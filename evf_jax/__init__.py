"""evf-jax: EVF-SAM (text-prompted Segment Anything) in JAX/Flax.

    from evf_jax import Predictor, load_image
    p = Predictor.from_checkpoint("checkpoints/evf-sam")
    p.set_image(load_image("zebra.jpg"))
    masks = p.predict(["zebra top left", "[semantic] sky"]).masks
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# The public API, name -> its module, imported on first use (PEP 562): importing any part of the package (the
# command line's argument parsing, evf_jax.errors) would otherwise import jax and the models first.
_EXPORTS = {
    "load_checkpoint": "evf_jax.checkpoints",
    "save_model": "evf_jax.checkpoints",
    "UserError": "evf_jax.errors",
    "EvfConfig": "evf_jax.evf",
    "EvfSam": "evf_jax.evf",
    "decode_image": "evf_jax.images",
    "load_image": "evf_jax.images",
    "Prediction": "evf_jax.predictor",
    "Predictor": "evf_jax.predictor",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs read
  from evf_jax.checkpoints import load_checkpoint, save_model
  from evf_jax.errors import UserError
  from evf_jax.evf import EvfConfig, EvfSam
  from evf_jax.images import decode_image, load_image
  from evf_jax.predictor import Prediction, Predictor


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
