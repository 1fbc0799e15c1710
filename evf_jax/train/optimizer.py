"""AdamW with warmup and decay, global-norm clipping, and weight decay on weight matrices only.

EVF-SAM's recipe is unpublished; its code is LISA's training script adapted (docs/data.md#7-training-recipe):
AdamW betas (0.9, 0.95), weight decay 0, peak lr 3e-4, linear warmup from 0 over 100 steps then linear decay to
0, gradient clipping at 1.0. Those are the configs' defaults where EVF-SAM's values are unknown.

`optimizer.name = "muon"` swaps AdamW for Muon on the dense weight matrices (docs/training.md#optimizers).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "muon")
# Muon's orthogonalised update has singular values ~1; scaled by sqrt(max(fan_in, fan_out)) * 0.2 its RMS is
# ~0.2, about that of an AdamW update, so one learning rate suits the matrices and the AdamW-updated rest
# (Liu et al. 2025, "Muon is Scalable for LLM Training").
MUON_RMS = 0.2


def learning_rate(peak: float, *, total_steps: int, warmup_steps: int, schedule: str = "linear",
                  end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then `schedule` down to end_factor * peak at total_steps."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule {schedule!r}: expected one of {SCHEDULES}")
  warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
  rest = max(1, int(total_steps) - warmup_steps)
  if schedule == "linear":
    decay = optax.linear_schedule(peak, peak * end_factor, rest)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, rest, alpha=end_factor)
  else:
    decay = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for weight matrices and conv kernels ("kernel" leaves), False for biases, norms, embedding tables,
  position tables and learned tokens."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: getattr(path[-1], "key", None) == "kernel" and x.ndim >= 2, params)


def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float = 1.0) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def is_matrix(path, x) -> bool:
  """Dense layers' weight matrices: the parameters Muon updates."""
  return getattr(path[-1], "key", None) == "kernel" and x.ndim == 2


def from_config(c: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer a config's `optimizer` section describes (ValueError for an unknown name)."""
  common = dict(b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, clip_norm=c.clip_norm)
  if c.name == "adamw":
    return adamw(schedule, **common)
  if c.name == "muon":
    return muon(schedule, momentum=c.muon_momentum, **common)
  raise ValueError(f"optimizer.name {c.name!r}: expected one of {OPTIMIZERS}")


def muon(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.0, clip_norm: float = 1.0, momentum: float = 0.95) -> optax.GradientTransformation:
  """Muon (Nesterov momentum `momentum`, orthogonalised by Newton-Schulz iterations, RMS-matched to AdamW) on
  the 2-D dense kernels, AdamW with Nesterov momentum on everything else (conv kernels, biases, norms,
  embeddings, tables); weight decay on kernels only, as in `adamw`."""
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, x: "muon" if is_matrix(path, x) else "adamw", params)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  parts.append(optax.partition({
      # Inside the partition contrib.muon sees only the matrices, so its own AdamW fallback receives nothing.
      "muon": optax.contrib.muon(schedule, beta=momentum, eps=eps, weight_decay=weight_decay,
                                 consistent_rms=MUON_RMS),
      # Nesterov momentum here too, as contrib.muon gives its own AdamW fallback.
      "adamw": optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                           nesterov=True),
  }, labels))
  return optax.chain(*parts)


def state_shardings(tx: optax.GradientTransformation, opt_shapes: Any, param_shardings: Any,
                    other: Any) -> Any:
  """Shardings of `tx`'s state: every tree shaped like the parameters as `param_shardings`, the rest `other`.
  Partitioned optimizers (Muon) hold such trees with the other partition's leaves masked out."""
  masked = lambda x: isinstance(x, optax.transforms.MaskedNode)
  return optax.tree_utils.tree_map_params(tx, lambda x, sh: x if masked(x) else sh, opt_shapes, param_shardings,
                                          transform_non_params=lambda _: other, is_leaf=masked)
