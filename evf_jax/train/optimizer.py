"""AdamW with warmup and decay, global-norm clipping, and weight decay on weight matrices only.

EVF-SAM's recipe is unpublished; its code is LISA's training script adapted (docs/data.md#7-training-recipe):
AdamW betas (0.9, 0.95), weight decay 0, peak lr 3e-4, linear warmup from 0 over 100 steps then linear decay to
0, gradient clipping at 1.0. Those are the configs' defaults where EVF-SAM's values are unknown.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")


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
