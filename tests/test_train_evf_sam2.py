"""Training EVF-SAM2 is proven like training EVF-SAM: the loss and the gradient of every trained parameter against
PyTorch autograd on the reference (PyPI sam2 + torchscale, random weights converted with our converter) running
EVF-SAM2's training forward, with the original's frozen set (all of SAM-2) and with SAM-2's decoder trained too
(its high-resolution projections run on the image side, where the frozen encoder's gradient stops); and the step
lowers the loss while SAM-2 stays bit-unchanged and holds no optimizer state."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from convert.evf_sam2 import convert_evf_sam2
from evf_jax import sharding
from evf_jax.evf_sam2 import EvfSam2, EvfSam2Config
from evf_jax.train import config as train_config
from evf_jax.train import optimizer, partition
from evf_jax.train.step import StepOptions, loss_fn, make_train_step
from evf_jax.train.trainer import fresh_state, state_layout
from evf_testing import torch_reference as tr
from evf_testing.sam2_reference import build_torch_evf_sam2
from evf_testing.training import TORCH_TRAINABLE_SAM2, assert_gradients_match, random_batch, torch_loss_and_grads

pytestmark = pytest.mark.usefixtures("fast_compile")  # toy sizes: compiling is the cost

TRAINABLE = train_config.EVF_SAM2_TRAINABLE
# SAM-2's decoder (conv_s0 / conv_s1 included) and no_mask_embed trained as well, as EVF-SAM trains SAM's.
WITH_DECODER = TRAINABLE + ("sam/sam_mask_decoder/.*", "sam/sam_prompt_encoder/no_mask_embed")
TORCH_WITH_DECODER = TORCH_TRAINABLE_SAM2 + ("visual_model.sam_mask_decoder.",
                                             "visual_model.sam_prompt_encoder.no_mask_embed")


def toy_config() -> EvfSam2Config:
  """The toy EVF-SAM2 with a text vocabulary and position table the random prompts fit."""
  cfg = EvfSam2Config.preset("toy")
  return dataclasses.replace(cfg, beit3=dataclasses.replace(cfg.beit3, vocab_size=320, max_source_positions=32))


@pytest.fixture(scope="module")
def reference():
  config = toy_config()
  model = build_torch_evf_sam2(config, seed=5)
  params = convert_evf_sam2(tr.state_dict_numpy(model), config).params
  return config, model, params


@pytest.mark.parametrize("trainable, torch_trainable", [(TRAINABLE, None), (WITH_DECODER, TORCH_WITH_DECODER)],
                         ids=["original-frozen-set", "decoder-trained"])
def test_gradients_match_pytorch(reference, trainable, torch_trainable):
  """One batch (two images, prompts of different lengths, one padding prompt), float32: the loss and every
  trained parameter's gradient equal autograd's. Gradients are mapped to our layout by the converter itself."""
  config, model, params = reference
  batch = random_batch(config, images=2, prompts=3, text_len=8, mask_size=48, seed=1, invalid=1)
  trained, frozen = partition.split(params, trainable)
  options = StepOptions(encoder_frozen=partition.encoder_frozen(trained))
  assert options.encoder_frozen
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn(EvfSam2(config), config, options), has_aux=True))(
      trained, frozen, batch)
  ref_loss, ref_grads = torch_loss_and_grads(model, config, batch, torch_trainable)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  ref_tree, _ = partition.split(convert_evf_sam2(ref_grads, config).params, trainable)
  ours = traverse_util.flatten_dict(grads, sep="/")
  want = traverse_util.flatten_dict(ref_tree, sep="/")
  assert set(ours) == set(want) and len(ours) > 30
  assert not any(k.startswith("sam/image_encoder") for k in ours)
  if trainable == WITH_DECODER:  # the projections of the high-res levels get their gradient through the image side
    for key in ("sam/sam_mask_decoder/conv_s0/kernel", "sam/sam_mask_decoder/conv_s1/kernel"):
      assert float(np.abs(want[key]).max()) > 0, key
  key, error = assert_gradients_match(ours, want)
  print(f"\nloss {float(loss):.6f} vs {ref_loss:.6f}; worst relative gradient error {error:.2e} ({key})")


def test_the_loss_sees_mask_0_not_the_inference_mask(reference):
  """Training decodes single-mask output in train mode (mask 0), not inference's best of masks 1-3 nor SAM-2's
  eval-mode stability fallback. A config with `multimask_output=False` (a decoder trained from scratch) decodes
  that mask 0 at inference too; a stored config without the field (converted before it existed) decodes as the
  original."""
  config, _, params = reference
  batch = random_batch(config, images=1, prompts=2, text_len=6, mask_size=32, seed=4, invalid=0)
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 128, 128, 3)))
  beit, ids = batch["beit_image"], batch["input_ids"][0]

  def run(m):
    feats = m.embed_image(x)
    prompts = m.text_prompts(beit, ids, batch["attention_mask"][0])
    return (m.decode_for_training(feats, prompts)[0], m.decode(feats, prompts)[0],
            m.decode_all(feats, prompts, multimask_output=True)[0])
  single = dataclasses.replace(config, multimask_output=False)
  train_mask, decoded, multi = jax.jit(lambda p: EvfSam2(config).apply({"params": p}, method=run))(params)
  assert train_mask.shape == (2, 1, 32, 32) and multi.shape == (2, 3, 32, 32)
  # Mask 0 of the 4 the decoder predicts is none of the three multimask outputs; inference keeps one of those.
  assert all(np.abs(np.asarray(train_mask) - np.asarray(multi[:, i:i + 1])).max() > 1e-3 for i in range(3))
  assert all(any(np.array_equal(np.asarray(decoded[n, 0]), np.asarray(multi[n, i])) for i in range(3)) for n in range(2))
  _, decoded_single, _ = jax.jit(lambda p: EvfSam2(single).apply({"params": p}, method=run))(params)
  np.testing.assert_array_equal(np.asarray(decoded_single), np.asarray(train_mask))
  stored = single.to_dict()
  assert EvfSam2Config.from_dict(stored) == single
  assert EvfSam2Config.from_dict({k: v for k, v in stored.items() if k != "multimask_output"}) == config


def _train(config, params, trainable, spec, devices, batch, steps, eps=1e-8):
  """`steps` AdamW steps on one batch on a mesh -> (state, per-step loss and gradient norm, state shardings)."""
  mesh = sharding.make_mesh(spec, devices)
  schedule = optimizer.learning_rate(3e-3, total_steps=100, warmup_steps=0, schedule="constant")
  tx = optimizer.adamw(schedule, weight_decay=0.01, eps=eps)
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  _, shards, _ = state_layout(config, trainable, tx, mesh, rules)
  options = StepOptions(encoder_frozen=partition.encoder_frozen(partition.split(params, trainable)[0]))
  batch_sh = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    step = jax.jit(make_train_step(EvfSam2(config), config, tx, schedule, options),
                   in_shardings=(shards, batch_sh), out_shardings=(shards, None), donate_argnums=0)
    state, trace = fresh_state(params, trainable, tx, shards), []
    for _ in range(steps):
      state, metrics = step(state, sharding.global_batch(batch, batch_sh))
      trace.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return state, trace, shards


def test_steps_lower_the_loss_and_leave_sam2_alone(reference):
  config, _, params = reference
  frozen_before = partition.split(params, TRAINABLE)[1]
  assert set(frozen_before) == {"sam"}
  batch = random_batch(config, images=2, prompts=3, mask_size=32, seed=2)
  state, trace, _ = _train(config, params, TRAINABLE, [("data", 1)], jax.devices()[:1], batch, 8)
  assert set(state["params"]) == {"beit3", "projector"}
  losses = [loss for loss, _ in trace]
  # Only BEiT-3 and the projector learn, through a random frozen decoder: slowly, but at every step.
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state["frozen"]), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_fsdp_on_8_devices_equals_one_device(reference):
  """One AdamW step with the whole image path trained (the Hiera trunk and neck too) on a (data 2, fsdp 4) mesh
  against one device: the same loss, gradient norm and parameters (float32 sums in another order), SAM-2's
  parameters sharded by the rules. eps = 1e-3 as in test_train_step's FSDP test (a first AdamW update of a
  gradient that is ~0 in exact arithmetic is otherwise anything in [-lr, lr])."""
  config, _, params = reference
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  trainable = train_config.EVF_SAM2_IMAGE_PATH
  batch = random_batch(config, images=8, prompts=2, mask_size=32, seed=4)
  one = _train(config, params, trainable, [("data", 1)], jax.devices()[:1], batch, 1, eps=1e-3)
  fsdp = _train(config, params, trainable, [("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices(), batch, 1,
                eps=1e-3)
  np.testing.assert_allclose(fsdp[1][0][0], one[1][0][0], rtol=1e-6)
  np.testing.assert_allclose(fsdp[1][0][1], one[1][0][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[0]["params"]), jax.tree.leaves(fsdp[0]["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  specs = sharding.describe(fsdp[2]["params"])
  sharded = [k for k, v in specs.items() if k.startswith("sam/image_encoder/") and "fsdp" in v]
  assert len(sharded) > 5, specs
