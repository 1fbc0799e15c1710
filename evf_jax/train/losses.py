"""EVF-SAM's training loss (docs/data.md#4-loss): per mask, the pixel mean of sigmoid binary cross-entropy and
the Dice loss of sigmoid probabilities; each term is a plain mean over the valid masks of a group of images (the
original's per-device micro-batch; or the whole batch), then a mean over the groups, and
total = bce_weight * BCE + dice_weight * Dice (2.0 and 0.5, LISA's defaults, which EVF-SAM's code inherits).

Dice, exactly as the reference writes it, with s = 1000 and eps = 1e-6:
    dice = 1 - (2 * sum(p / s * t) + eps) / (sum(p / s) + sum(t / s) + eps)
The reference computes both at each image's original resolution; we compute them over the valid (unpadded)
region of the SAM frame at the loss resolution (`valid_region`), see docs/data.md#4-loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

DICE_SCALE = 1000.0
DICE_EPS = 1e-6
MASK_COUNT_EPS = 1e-8  # the reference's "+ 1e-8" on the number of masks
METRICS = ("loss", "bce", "dice", "masks")  # the float32 scalars mask_loss reports


@dataclasses.dataclass(frozen=True)
class LossWeights:
  bce: float = 2.0
  dice: float = 0.5


def per_mask_losses(logits: jax.Array, targets: jax.Array, region: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(N, S, S) logits and {0,1} targets, region (N or 1, S, S) bool of pixels that count -> BCE (N,), Dice (N,).

  Computed in float32 whatever the logits' dtype."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  r = jnp.broadcast_to(region, x.shape).astype(jnp.float32)
  axes = (-2, -1)
  bce = jnp.sum(optax.sigmoid_binary_cross_entropy(x, t) * r, axis=axes) / jnp.maximum(jnp.sum(r, axis=axes), 1.0)
  p = jax.nn.sigmoid(x) * r
  t = t * r
  numerator = 2.0 * jnp.sum(p / DICE_SCALE * t, axis=axes)
  denominator = jnp.sum(p / DICE_SCALE, axis=axes) + jnp.sum(t / DICE_SCALE, axis=axes)
  dice = 1.0 - (numerator + DICE_EPS) / (denominator + DICE_EPS)
  return bce, dice


def mask_loss(logits: jax.Array, targets: jax.Array, region: jax.Array, valid: jax.Array,
              weights: LossWeights = LossWeights(), groups: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch loss over valid masks only: logits/targets (N, S, S), region (N, S, S), valid (N,) bool.

  groups: the N masks split into this many contiguous groups of equal size (the masks of a group of images);
  each term is the mean over a group's valid masks, then the mean over the groups. With one group, a plain mean
  over the valid masks of the batch.
  Returns (total, {METRICS}): padding prompts (valid False) contribute nothing."""
  bce, dice = per_mask_losses(logits, targets, region)
  v = valid.astype(jnp.float32).reshape(groups, -1)
  count = jnp.sum(v, axis=1)
  bce_mean = jnp.mean(jnp.sum(bce.reshape(groups, -1) * v, axis=1) / (count + MASK_COUNT_EPS))
  dice_mean = jnp.mean(jnp.sum(dice.reshape(groups, -1) * v, axis=1) / (count + MASK_COUNT_EPS))
  total = weights.bce * bce_mean + weights.dice * dice_mean
  return total, {"loss": total, "bce": bce_mean, "dice": dice_mean, "masks": jnp.sum(count)}
