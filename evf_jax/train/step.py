"""The training step: EVF-SAM's (or EVF-SAM2's) forward pass on a batch of images with up to K prompts each, the
loss over the valid prompts, gradients of the trained parameters only, and one optimizer update.

Batch (global arrays, leading axis split over the mesh's batch axes; from `data_pipelines.pipeline`):
  sam_image (B, S, S, 3) uint8, resize_hw (B, 2), beit_image (B, b, b, 3) f32, input_ids / attention_mask
  (B, K, L), prompt_valid (B, K), masks (B, K, M, M) uint8 in the SAM frame at the loss resolution M,
  valid_region (B, M, M). EVF-SAM2's images fill the frame (stretched to a square): resize_hw is (S, S).

Forward: SAM's image embedding once per image (without gradients when the encoder is frozen); BEiT-3 on each
(image, prompt) pair, its CLS through the projector; SAM's decoder per prompt on its image's embedding
(SAM: single-mask output; SAM-2: the mask its inference keeps, `EvfSam2.decode_for_training`); the low-res
logits resized bilinearly to M (SAM's postprocess without the crop, which `valid_region` replaces; SAM-2's
resize straight to the image's size, here in the square frame).

State: a dict {"step", "params" (trained), "frozen", "opt_state"}; the optimizer sees the trained parameters
only. Gradient accumulation runs `grad_accum` microbatches inside the step (`lax.scan`), each spread over all
devices, so one host step is one optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evf_jax import families, layers, postprocess
from evf_jax.evf import EvfSam
from evf_jax.evf_sam2 import EvfSam2
from evf_jax.families import ModelConfig
from evf_jax.train import losses, partition

BATCH_KEYS = ("sam_image", "resize_hw", "beit_image", "input_ids", "attention_mask", "prompt_valid", "masks",
              "valid_region")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  dtype: Any = jnp.float32         # compute dtype; parameters and optimizer state stay float32
  grad_accum: int = 1              # microbatches per optimizer step
  loss_weights: losses.LossWeights = losses.LossWeights()
  loss_group: int = 0              # images per loss mean (a mean over the groups follows); 0: the whole microbatch
  encoder_frozen: bool = True      # SAM's image encoder has no trained parameter: run it without gradients

  @classmethod
  def from_config(cls, cfg, dtype: Any, encoder_frozen: bool) -> "StepOptions":
    """The options a training config (evf_jax/train/config.py) sets."""
    return cls(dtype=dtype, grad_accum=cfg.grad_accum, encoder_frozen=encoder_frozen,
               loss_weights=losses.LossWeights(cfg.loss.bce_weight, cfg.loss.dice_weight),
               loss_group=cfg.loss.images_per_group)


def upsample_matrix(low: int, size: int) -> np.ndarray:
  """(size, low) float32: bilinear, half-pixel centres, no antialias (SAM's first postprocess resize)."""
  return postprocess.bilinear_matrix(low, size).astype(np.float32)


def forward(model: EvfSam | EvfSam2, config: ModelConfig, params: Any, batch: dict,
            options: StepOptions) -> jax.Array:
  """Mask logits (B, K, M, M) in float32 at the loss resolution M of `batch["masks"]`."""
  v = {"params": params}
  b, k, length = batch["input_ids"].shape
  m = batch["masks"].shape[-1]
  x = families.image_input(config).normalize(batch["sam_image"], batch["resize_hw"]).astype(options.dtype)
  # Once per image: SAM's embedding, or SAM-2's (embedding, high-res features).
  features = model.apply(v, x, options.encoder_frozen, method="embed_image_for_training")
  beit = batch["beit_image"].astype(options.dtype)  # BEiT-3 embeds each image once for its K prompts
  prompts = model.apply(v, layers.batch_constraint(beit), batch["input_ids"].reshape(b * k, length),
                        batch["attention_mask"].reshape(b * k, length), method="text_prompts")
  per_prompt = jax.tree.map(lambda f: layers.batch_constraint(jnp.repeat(f, k, axis=0)), features)
  low, _ = model.apply(v, per_prompt, prompts, method="decode_for_training")  # (B*K, 1, l, l)
  a = jnp.asarray(upsample_matrix(low.shape[-1], m))
  logits = jnp.einsum("hk,nkl,wl->nhw", a, low[:, 0].astype(jnp.float32), a, precision="highest")
  return logits.reshape(b, k, m, m)


def loss_fn(model: EvfSam | EvfSam2, config: ModelConfig, options: StepOptions) -> Callable:
  """(trained, frozen, batch) -> (loss, metrics)."""

  def fn(trained, frozen, batch):
    logits = forward(model, config, partition.merge(trained, frozen), batch, options)
    b, k, m, _ = logits.shape
    region = jnp.repeat(batch["valid_region"], k, axis=0)
    return losses.mask_loss(logits.reshape(b * k, m, m), batch["masks"].reshape(b * k, m, m), region,
                            batch["prompt_valid"].reshape(b * k), options.loss_weights,
                            groups=b // options.loss_group if options.loss_group else 1)
  return fn


def _microbatches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B / n, ...) with microbatch i = rows i, i + n, i + 2n, ...: every device holds B / n / D
  rows of each microbatch when the batch is split over D devices in contiguous blocks."""
  def one(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def accumulated_gradients(grad_fn: Callable, params: Any, frozen: Any, batch: dict, n: int) -> tuple[Any, dict]:
  """`grad_fn(params, frozen, batch) -> ((loss, metrics), grads)` over `n` microbatches in a `lax.scan`: the
  mean of their gradients and of their metrics (losses.METRICS)."""
  if n == 1:
    (_, metrics), grads = grad_fn(params, frozen, batch)
    return grads, metrics

  def body(carry, micro):
    g_sum, m_sum = carry
    micro = jax.tree.map(layers.batch_constraint, micro)
    (_, m), g = grad_fn(params, frozen, micro)
    return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in losses.METRICS})
  (grads, metrics), _ = jax.lax.scan(body, zeros, _microbatches(batch, n))
  return jax.tree.map(lambda g: g / n, grads), {k: v / n for k, v in metrics.items()}


def make_train_step(model: EvfSam | EvfSam2, config: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, options: StepOptions) -> Callable:
  """(state, batch) -> (state, metrics); pure, for `jax.jit` with donated state."""
  grad_fn = jax.value_and_grad(loss_fn(model, config, options), has_aux=True)

  def step(state, batch):
    params, frozen = state["params"], state["frozen"]
    batch = {k: batch[k] for k in BATCH_KEYS}
    grads, metrics = accumulated_gradients(grad_fn, params, frozen, batch, options.grad_accum)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]),
                   param_norm=optax.tree.norm(new_params), update_norm=optax.tree.norm(updates))
    return {"step": state["step"] + 1, "params": new_params, "frozen": frozen, "opt_state": opt_state}, metrics

  return step
