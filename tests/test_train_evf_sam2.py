"""Training EVF-SAM2 is proven like training EVF-SAM: the loss and the gradient of every trained parameter against
PyTorch autograd on the reference (PyPI sam2 + torchscale, random weights converted with our converter) running
EVF-SAM2's training forward (the best of masks 1-3, or mask 0), with the original's frozen set (all of SAM-2) and
with SAM-2's decoder trained too
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


@pytest.mark.parametrize("trainable, torch_trainable, multimask", [
    (TRAINABLE, None, True), pytest.param(WITH_DECODER, TORCH_WITH_DECODER, True, marks=pytest.mark.slow),
    (TRAINABLE, None, False)],
    ids=["original-frozen-set", "decoder-trained", "mask-0"])
def test_gradients_match_pytorch(reference, trainable, torch_trainable, multimask):
  """One batch (two images, prompts of different lengths, one padding prompt), float32: the loss and every
  trained parameter's gradient equal autograd's, keeping the best of masks 1-3 as the original's forward (or, with
  `multimask_output` False, mask 0). Gradients are mapped to our layout by the converter itself."""
  config, model, params = reference
  config = dataclasses.replace(config, multimask_output=multimask)
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


def test_the_loss_sees_the_mask_inference_keeps(reference):
  """Training keeps the mask inference keeps: the best of masks 1-3 by predicted IoU (the IoU head's bias is
  raised for one mask at a time: the kept mask follows it), never mask 0; with `multimask_output=False` (a
  decoder trained from scratch), mask 0 of the single-mask output in train mode for both, not SAM-2's eval-mode
  stability fallback. A stored config without the field (converted before it existed) decodes as the original."""
  config, _, params = reference
  batch = random_batch(config, images=1, prompts=2, text_len=6, mask_size=32, seed=4, invalid=0)
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 128, 128, 3)))
  beit, ids = batch["beit_image"], batch["input_ids"][0]
  flat = traverse_util.flatten_dict(params, sep="/")
  iou_bias = max(k for k in flat if "iou_prediction_head" in k and k.endswith("bias"))  # the last layer's

  def run(m):
    feats = m.embed_image(x)
    prompts = m.text_prompts(beit, ids, batch["attention_mask"][0])
    masks, iou, _, _ = m.decode_all(feats, prompts, multimask_output=True)
    single, _, _, _ = m.sam.decode(feats[0], feats[1], extra_sparse=prompts[:, None, :], multimask_output=False,
                                   training=True)
    return m.decode_for_training(feats, prompts)[0], m.decode(feats, prompts)[0], masks, iou, single

  programs = {m: jax.jit(lambda p, c=dataclasses.replace(config, multimask_output=m): EvfSam2(c).apply(
      {"params": p}, method=run)) for m in (True, False)}  # one compile each; the biases are arguments
  for multimask, favoured in ((True, 1), (True, 2), (True, 3), (False, 2)):
    bias = np.asarray(flat[iou_bias]) + 10.0 * (np.arange(4) == favoured)
    p = traverse_util.unflatten_dict({**flat, iou_bias: bias}, sep="/")
    train_mask, decoded, multi, iou, mask0 = map(np.asarray, programs[multimask](p))
    assert train_mask.shape == (2, 1, 32, 32) and multi.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(train_mask, decoded)
    # Mask 0 of the 4 the decoder predicts is none of the three multimask outputs.
    assert all(np.abs(mask0 - multi[:, i:i + 1]).max() > 1e-3 for i in range(3))
    if multimask:
      assert (iou.argmax(-1) == favoured - 1).all(), iou
      np.testing.assert_array_equal(train_mask, multi[:, favoured - 1:favoured])
    else:
      np.testing.assert_array_equal(train_mask, mask0)
  single = dataclasses.replace(config, multimask_output=False)
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
  # Mask 0: through a random frozen decoder the best of masks 1-3 by its random IoU head changes as the prompt
  # moves, so that loss jumps between masks; its gradients are proven above.
  config = dataclasses.replace(config, multimask_output=False)
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
