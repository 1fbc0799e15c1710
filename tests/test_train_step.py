"""Training is proven like inference: the loss against a numpy transcription of EVF-SAM's formula, the gradients
of every trained parameter against PyTorch autograd on the reference model (PyPI segment-anything + torchscale,
converted with our converter), and the step itself: it lowers the loss, leaves frozen parameters untouched and
gives them no optimizer state, accumulates gradients, and computes the same on 8 devices with FSDP as on one."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from convert.evf import convert_evf
from evf_jax import sharding
from evf_jax.evf import EvfSam, abstract_params, init_params
from evf_jax.train import config as train_config
from evf_jax.train import losses, optimizer, partition
from evf_jax.train.step import StepOptions, accumulated_gradients, loss_fn, make_train_step
from evf_jax.train.trainer import fresh_state, state_layout
from evf_testing import evf_reference as ref
from evf_testing import torch_reference as tr
from evf_testing.training import assert_gradients_match, random_batch, tiny_config, torch_loss_and_grads

TRAINABLE = train_config.EVF_SAM_TRAINABLE


@pytest.fixture(scope="module", autouse=True)
def _compile_fast(fast_compile):
  yield


# ---------------------------------------------------------------- the loss


def numpy_loss(logits, targets, region, valid, w_bce=2.0, w_dice=0.5):
  """EVF-SAM's sigmoid BCE (pixel mean) + Dice (s = 1000, eps = 1e-6), plain means over the valid masks,
  written from the formula with the pixels outside `region` removed."""
  bces, dices = [], []
  for x, t, r, v in zip(logits.astype(np.float64), targets.astype(np.float64), region, valid):
    if not v:
      continue
    x, t = x[r], t[r]
    bces.append(np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))))
    p = 1 / (1 + np.exp(-x))
    dices.append(1 - (2 * np.sum(p / 1000 * t) + 1e-6) / (np.sum(p / 1000) + np.sum(t / 1000) + 1e-6))
  n = len(bces) + 1e-8
  return w_bce * sum(bces) / n + w_dice * sum(dices) / n, sum(bces) / n, sum(dices) / n


def test_loss_matches_numpy():
  rng = np.random.default_rng(0)
  n, m = 7, 24
  logits = rng.normal(0, 4, (n, m, m)).astype(np.float32)
  targets = (rng.random((n, m, m)) < 0.3).astype(np.uint8)
  targets[2] = 0  # an empty target (a no-object prompt) ...
  logits[2] -= 30  # ... predicted empty: where Dice's scale (1/1000) and eps decide the value
  region = np.zeros((n, m, m), bool)
  for i in range(n):
    region[i, :rng.integers(8, m + 1), :rng.integers(8, m + 1)] = True
  valid = np.array([1, 1, 1, 0, 1, 0, 1], bool)
  logits[~valid] = 1e4  # padding prompts with absurd logits must not matter
  total, metrics = jax.jit(losses.mask_loss)(logits, targets, region, valid)
  want, bce, dice = numpy_loss(logits, targets, region, valid)
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["bce"]), bce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["dice"]), dice, rtol=1e-5)
  assert float(metrics["masks"]) == 5 and set(metrics) == set(losses.METRICS)  # what accumulation averages
  total2, _ = losses.mask_loss(logits, targets, region, valid, losses.LossWeights(bce=1.0, dice=0.0))
  np.testing.assert_allclose(float(total2), bce, rtol=1e-5)


def test_grouped_loss_is_the_mean_of_group_means():
  """Groups of images (the original's per-device micro-batch): a mean over each group's valid masks, then over
  the groups; with groups holding 1 and 5 valid masks, not the plain mean over all 6."""
  rng = np.random.default_rng(1)
  n, m = 12, 16
  logits = rng.normal(0, 4, (n, m, m)).astype(np.float32)
  targets = (rng.random((n, m, m)) < 0.3).astype(np.uint8)
  region = np.ones((n, m, m), bool)
  valid = np.array([1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1], bool)
  total, metrics = jax.jit(losses.mask_loss, static_argnames="groups")(logits, targets, region, valid, groups=2)
  want = [numpy_loss(logits[s], targets[s], region[s], valid[s]) for s in (slice(0, 6), slice(6, 12))]
  np.testing.assert_allclose(float(total), np.mean([w[0] for w in want]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["bce"]), np.mean([w[1] for w in want]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["dice"]), np.mean([w[2] for w in want]), rtol=1e-5)
  assert float(metrics["masks"]) == 6
  assert abs(float(total) - numpy_loss(logits, targets, region, valid)[0]) > 1e-3


# ---------------------------------------------------------------- gradients against PyTorch


@pytest.fixture(scope="module")
def reference():
  config = tiny_config()
  model = ref.build_torch_evf(config, seed=7)
  params = convert_evf(tr.state_dict_numpy(model), config).params
  return config, model, params


def test_gradients_match_pytorch(reference):
  """One batch (two images of different shapes, prompts of different lengths, one padding prompt): the loss and
  the gradient of every trained parameter equal PyTorch autograd's, in float32. Gradients are mapped to our
  layout by the converter itself (a gradient has its parameter's layout)."""
  config, model, params = reference
  batch = random_batch(config, images=2, prompts=3, text_len=8, mask_size=48, seed=1, invalid=1)
  trained, frozen = partition.split(params, TRAINABLE)
  options = StepOptions(encoder_frozen=True)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn(EvfSam(config), config, options), has_aux=True))(
      trained, frozen, batch)
  ref_loss, ref_grads = torch_loss_and_grads(model, config, batch)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  ref_tree, _ = partition.split(convert_evf(ref_grads, config).params, TRAINABLE)
  ours = traverse_util.flatten_dict(grads, sep="/")
  want = traverse_util.flatten_dict(ref_tree, sep="/")
  assert set(ours) == set(want) and len(ours) > 50
  assert any(k.startswith("beit3/") for k in ours) and "sam/prompt_encoder/no_mask_embed" in ours
  assert not any(k.startswith("sam/image_encoder") for k in ours)
  key, error = assert_gradients_match(ours, want)
  print(f"\nloss {float(loss):.6f} vs {ref_loss:.6f}; worst relative gradient error {error:.2e} ({key})")


# ---------------------------------------------------------------- the step


def _setup(config, trainable, mesh, grad_accum=1, lr=3e-3, warmup=0, sgd=False, eps=1e-8, muon=False):
  schedule = optimizer.learning_rate(lr, total_steps=100, warmup_steps=warmup, schedule="constant")
  if sgd:
    tx = optax.sgd(schedule)
  else:
    tx = (optimizer.muon if muon else optimizer.adamw)(schedule, weight_decay=0.01, eps=eps)
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  shapes, shards, report = state_layout(config, trainable, tx, mesh, rules)
  options = StepOptions(grad_accum=grad_accum, encoder_frozen=partition.encoder_frozen(shapes["params"]))
  fn = make_train_step(EvfSam(config), config, tx, schedule, options)
  batch_sh = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    step = jax.jit(fn, in_shardings=(shards, batch_sh), out_shardings=(shards, None), donate_argnums=0)
  return tx, shards, rules, report, step, batch_sh


def _run(step, state, batch, batch_sh, mesh, rules, n):
  """n steps on one batch -> (state, [metrics of each step])."""
  trace = []
  with sharding.activate(mesh, rules):
    for _ in range(n):
      state, metrics = step(state, sharding.global_batch(batch, batch_sh))
      trace.append({k: float(v) for k, v in metrics.items()})
  return state, trace


@pytest.fixture(scope="module")
def start():
  config = tiny_config()
  return config, jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))


def _momenta(opt_state) -> dict[str, set[str]]:
  """{optimizer state type: paths of the parameters it holds a first moment for}."""
  out = {}
  for path, mu in optax.tree_utils.tree_get_all_with_path(opt_state, "mu"):
    kind = path[-1].tuple_name  # MuonState or ScaleByAdamState
    flat = traverse_util.flatten_dict(mu, sep="/") if isinstance(mu, dict) else {}
    out.setdefault(kind, set()).update(k for k, v in flat.items() if not isinstance(v, optax.transforms.MaskedNode))
  return out


@pytest.mark.parametrize("muon", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_steps_lower_the_loss_and_leave_frozen_parameters_alone(start, muon):
  config, params = start
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  tx, shards, rules, _, step, batch_sh = _setup(config, TRAINABLE, mesh, muon=muon)
  state = fresh_state(params, TRAINABLE, tx, shards)
  frozen_before = jax.tree.map(np.asarray, state["frozen"])
  assert "image_encoder" in frozen_before["sam"] and "image_encoder" not in state["params"].get("sam", {})
  moments = _momenta(state["opt_state"])  # trained parameters only, each in one optimizer's state
  assert sorted(p for held in moments.values() for p in held) == sorted(
      traverse_util.flatten_dict(state["params"], sep="/"))
  batch = random_batch(config, images=2, prompts=3, mask_size=48, seed=2)
  state, trace = _run(step, state, batch, batch_sh, mesh, rules, 8)
  losses_ = [m["loss"] for m in trace]
  assert losses_[-1] < 0.8 * losses_[0], losses_
  assert int(state["step"]) == 8
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_the_state_starts_in_float32_from_bfloat16_parameters(start):
  """An init checkpoint converted with --precision bf16 gives bfloat16 host parameters: the state still holds
  float32 parameters, frozen ones included, and float32 optimizer moments, as the layout a resume restores into."""
  config, params = start
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  tx = optimizer.adamw(optimizer.learning_rate(1e-3, total_steps=10, warmup_steps=0, schedule="constant"))
  shapes, shards, _ = state_layout(config, TRAINABLE, tx, mesh, sharding.rules_for(mesh, sharding.DEFAULT_RULES))
  state = fresh_state(jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params), TRAINABLE, tx, shards)
  for part in ("params", "frozen", "opt_state"):
    want = {str(s.dtype) for s in jax.tree.leaves(shapes[part]) if jnp.issubdtype(s.dtype, jnp.floating)}
    got = {str(x.dtype) for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert want == got == {"float32"}, (part, want, got)


def test_buffers_of_the_originals_are_never_trained(start):
  """`.*` trains every parameter except SAM's random spatial frequencies, a buffer in PyTorch; a pattern that
  names only that buffer is reported as matching nothing trainable."""
  _, params = start
  gaussian = "sam/prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"
  trained, frozen = partition.split(params, (".*",))
  assert partition.paths(frozen) == [gaussian]
  assert len(partition.paths(trained)) == len(partition.paths(params)) - 1
  assert partition.check_patterns(partition.paths(params), ("sam/prompt_encoder/pe_layer/.*", ".*")) == [
      repr("sam/prompt_encoder/pe_layer/.*")]
  # a pattern matches whole paths: "mask_decoder/.*" names nothing, "sam/mask_decoder/.*" the decoder
  assert partition.paths(partition.split(params, ("mask_decoder/.*",))[0]) == []
  assert partition.check_patterns(partition.paths(params), ("mask_decoder/.*",)) == [repr("mask_decoder/.*")]
  decoder = partition.paths(partition.split(params, ("sam/mask_decoder/.*",))[0])
  assert decoder and all(p.startswith("sam/mask_decoder/") for p in decoder)


def test_patterns_match_whole_paths_and_either_family_s_decoder_counts_as_trained():
  """A pattern names whole paths: "layers_1" is not a prefix of layers_1's or layers_10's parameters (a typo'd
  pattern is reported, not widened). A trained decoder is SAM's `mask_decoder` or SAM-2's `sam_mask_decoder`
  (it decides the step's FLOPs and the MFU)."""
  params = {"beit3": {"layers_1": {"kernel": 1}, "layers_10": {"kernel": 2}},
            "sam": {"image_encoder": {"kernel": 3}, "mask_decoder": {"kernel": 4}, "sam_mask_decoder": {"kernel": 5}}}
  all_paths = partition.paths(params)
  assert partition.paths(partition.split(params, ("beit3/layers_1",))[0]) == []
  assert partition.check_patterns(all_paths, ("beit3/layers_1", "beit3/layers_1/kernel")) == [repr("beit3/layers_1")]
  assert partition.paths(partition.split(params, ("beit3/layers_1/kernel",))[0]) == ["beit3/layers_1/kernel"]
  for decoder in ("mask_decoder", "sam_mask_decoder"):
    trained = partition.split(params, (f"sam/{decoder}/.*",))[0]
    assert partition.decoder_trained(trained) and partition.encoder_frozen(trained), decoder
  trained = partition.split(params, ("beit3/.*", "sam/image_encoder/.*"))[0]
  assert not partition.decoder_trained(trained) and not partition.encoder_frozen(trained)


def test_muon_updates_the_matrices_and_shards_its_state_like_them(start):
  """optimizer.name = "muon": Muon's momentum for exactly the 2-D dense kernels, AdamW's moments for the rest
  (conv kernels, biases, norms, embeddings, tables); on a (data 2, fsdp 4) mesh each momentum is laid out like
  its parameter. (Steps with it: test_steps_lower_the_loss...[True], slow, and the synthetic config.)"""
  config, _ = start
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices())
  schedule = optimizer.learning_rate(1e-3, total_steps=10, warmup_steps=0, schedule="constant")
  tx = optimizer.muon(schedule)
  shapes, shards, _ = state_layout(config, TRAINABLE, tx, mesh, sharding.rules_for(mesh, sharding.DEFAULT_RULES))
  trained = traverse_util.flatten_dict(shapes["params"], sep="/")
  matrices = {k for k, v in trained.items() if k.endswith("/kernel") and v.ndim == 2}
  assert len(matrices) > 10 and any(k.endswith("/kernel") and v.ndim == 4 for k, v in trained.items())
  momenta = _momenta(shapes["opt_state"])
  assert momenta["MuonState"] == matrices, momenta["MuonState"] ^ matrices
  assert momenta["ScaleByAdamState"] == set(trained) - matrices
  param_specs = sharding.describe(shards["params"])
  for _, mu in optax.tree_utils.tree_get_all_with_path(shards["opt_state"], "mu"):
    for k, sh in traverse_util.flatten_dict(mu, sep="/").items():
      if not isinstance(sh, optax.transforms.MaskedNode):
        assert str(sh.spec) == param_specs[k], k
  assert param_specs["beit3/encoder/layers_0/ffn/A/fc1/kernel"] == str(jax.sharding.PartitionSpec("fsdp", "tensor"))


def test_replicate_frozen_holds_the_frozen_parameters_whole(start):
  """`replicate_frozen`: the frozen parameters (SAM's image encoder) are whole on every device, so FSDP does not
  gather them in every step; the trained ones and the optimizer state keep the rules' sharding."""
  config, _ = start
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices())
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  tx = optimizer.adamw(1e-3)
  _, sharded, _ = state_layout(config, TRAINABLE, tx, mesh, rules)
  _, whole, _ = state_layout(config, TRAINABLE, tx, mesh, rules, replicate_frozen=True)
  frozen = sharding.describe(whole["frozen"])
  assert "sam/image_encoder/blocks_0/mlp/lin1/kernel" in frozen
  assert set(frozen.values()) == {str(jax.sharding.PartitionSpec())}
  assert set(sharding.describe(sharded["frozen"]).values()) != {str(jax.sharding.PartitionSpec())}
  for part in ("params", "opt_state"):
    assert jax.tree.leaves(whole[part]) == jax.tree.leaves(sharded[part])


def test_accumulated_gradients_are_the_mean_over_microbatches():
  """On a least-squares loss: n microbatches (rows i, i + n, ...) give the mean of their gradients and metrics,
  which for equal-sized microbatches of a mean loss is the whole batch's gradient. The model's step with
  accumulation is checked in the slow test below."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 3)).astype(np.float32), rng.normal(size=(12,)).astype(np.float32)
  params, frozen = {"w": np.float32([0.5, -1.0, 2.0])}, {"b": np.float32(0.25)}

  def grad_fn(p, f, batch):
    def loss(p):
      r = batch["x"] @ p["w"] + f["b"] - batch["y"]
      total = jnp.mean(r ** 2)
      return total, {"loss": total, "bce": jnp.mean(r), "dice": jnp.max(r), "masks": jnp.float32(r.shape[0])}
    return jax.value_and_grad(loss, has_aux=True)(p)

  batch = {"x": x, "y": y}
  for n in (1, 2, 3):
    grads, metrics = jax.jit(accumulated_gradients, static_argnums=(0, 4))(grad_fn, params, frozen, batch, n)
    micro = [grad_fn(params, frozen, {k: v[i::n] for k, v in batch.items()}) for i in range(n)]
    np.testing.assert_allclose(grads["w"], np.mean([g["w"] for (_, _), g in micro], 0), rtol=1e-5)
    np.testing.assert_allclose(grads["w"], grad_fn(params, frozen, batch)[1]["w"], rtol=1e-5)
    assert set(metrics) == set(losses.METRICS)
    for k in losses.METRICS:
      np.testing.assert_allclose(metrics[k], np.mean([m[k] for (_, m), _ in micro]), rtol=1e-5, err_msg=k)


def test_the_loss_groups_and_the_frozen_encoder_follow_the_config(start):
  """loss.images_per_group reaches the loss (groups of that many images, then a mean over groups), and the
  image encoder counts as frozen only while no parameter of it is trained (encoder_frozen decides whether it
  runs without gradients)."""
  config, params = start
  batch = random_batch(config, images=4, prompts=2, mask_size=16, seed=4, invalid=3)
  trained, frozen = partition.split(params, TRAINABLE)
  loss = lambda options: float(jax.jit(loss_fn(EvfSam(config), config, options))(trained, frozen, batch)[0])
  whole, grouped = loss(StepOptions(loss_group=0)), loss(StepOptions(loss_group=1))
  assert abs(whole - grouped) > 1e-4, (whole, grouped)
  assert StepOptions.from_config(train_config.base_config(), np.float32, encoder_frozen=True).loss_group == 2
  assert partition.encoder_frozen(trained)
  assert not partition.encoder_frozen(partition.split(params, TRAINABLE + ("sam/image_encoder/blocks_0/.*",))[0])


@pytest.mark.slow
def test_gradient_accumulation_equals_the_mean_of_microbatch_gradients(start):
  """Two microbatches in one step: the gradient is the mean of the two microbatches' (its norm, reported by the
  step, to float rounding), and with plain SGD (an update linear in the gradient) the parameters move by
  -lr times that mean."""
  config, params = start
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  tx, shards, rules, _, step2, batch_sh = _setup(config, TRAINABLE, mesh, grad_accum=2, sgd=True)
  batch = random_batch(config, images=4, prompts=2, mask_size=48, seed=3, invalid=0)
  state, trace = _run(step2, fresh_state(params, TRAINABLE, tx, shards), batch, batch_sh, mesh, rules, 1)
  trained, frozen = partition.split(params, TRAINABLE)
  grad = jax.jit(jax.grad(lambda t, f, b: loss_fn(EvfSam(config), config, StepOptions())(t, f, b)[0]))
  micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]  # rows i, i + 2: the step's split
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *[grad(trained, frozen, m) for m in micro])
  np.testing.assert_allclose(trace[0]["grad_norm"], float(optax.tree.norm(mean)), rtol=1e-5)
  updates, _ = tx.update(mean, tx.init(trained), trained)
  want = jax.tree.map(lambda p, u: p + u, trained, updates)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(mean))  # zero-gradient leaves: float noise
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-5 * 3e-3 * scale)


@pytest.mark.slow
def test_fsdp_on_8_devices_equals_one_device(start):
  """One AdamW step with everything trained on a (data 2, fsdp 4) mesh against one device: the same loss and
  gradient norm (float32 sums in another order: 1e-6, 1e-5), the same parameters, and parameters / optimizer
  moments sharded as the rules say. AdamW's first update is lr * g / (|g| + eps): with the default eps a
  gradient entry that is ~0 in exact arithmetic (float noise ~1e-10) moves its parameter by anything in
  [-lr, lr], so this comparison uses eps = 1e-3, where the update is smooth in g."""
  config, params = start
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  batch = random_batch(config, images=8, prompts=2, mask_size=48, seed=4)
  results = {}
  for name, spec, devices in (("one", [("data", 1)], jax.devices()[:1]),
                              ("fsdp", [("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices())):
    mesh = sharding.make_mesh(spec, devices)
    tx, shards, rules, report, step, batch_sh = _setup(config, (".*",), mesh, eps=1e-3)
    state, trace = _run(step, fresh_state(params, (".*",), tx, shards), batch, batch_sh, mesh, rules, 1)
    results[name] = (state, trace, shards, report)
  one, fsdp = results["one"], results["fsdp"]
  np.testing.assert_allclose(fsdp[1][0]["loss"], one[1][0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(fsdp[1][0]["grad_norm"], one[1][0]["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one[0]["params"]), jax.tree.leaves(fsdp[0]["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  specs = sharding.describe(fsdp[2]["params"])
  assert specs["beit3/encoder/layers_0/ffn/A/fc1/kernel"] == str(jax.sharding.PartitionSpec("fsdp", "tensor"))
  assert specs["sam/image_encoder/blocks_0/attn/qkv/kernel"] == str(jax.sharding.PartitionSpec("fsdp", "tensor"))
  assert specs["beit3/encoder/layers_0/ffn/A/fc1/bias"] == str(jax.sharding.PartitionSpec("tensor"))
  # The test vocabulary (320) divides over fsdp=4: the text embedding is sharded; SAM's rel-pos tables are
  # not named and stay replicated; nothing needed a fallback at these sizes except what the report lists.
  assert specs["beit3/text_embed/embedding"] == str(jax.sharding.PartitionSpec("tensor", "fsdp"))
  mu = sharding.describe(jax.tree.map(lambda x: x.sharding, fsdp[0]["opt_state"][1][0].mu))
  assert mu["beit3/encoder/layers_0/ffn/A/fc1/kernel"] == specs["beit3/encoder/layers_0/ffn/A/fc1/kernel"]
  actual = fsdp[0]["params"]["beit3"]["encoder"]["layers_0"]["ffn"]["A"]["fc1"]["kernel"].sharding.spec
  assert actual == jax.sharding.PartitionSpec("fsdp", "tensor")
  for line in fsdp[3]:
    assert "over fsdp=4" in line


def test_indivisible_dimensions_fall_back_to_replication():
  """BEiT-3's real vocabulary (64010 rows, odd after /2) over tensor=4: replicated along that dimension, reported."""
  config = tiny_config(vocab_size=64010)
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh([("data", 2), ("tensor", 4)], jax.devices()[:8])
  shardings, report = sharding.param_shardings(abstract_params(config, boxed=True), mesh,
                                               sharding.rules_for(mesh, sharding.DEFAULT_RULES))
  spec = sharding.describe(shardings)["beit3/text_embed/embedding"]
  assert spec == str(jax.sharding.PartitionSpec(None, None))
  assert any("beit3/text_embed/embedding: dim 0 (64010) over tensor=4" in line for line in report), report
  assert sharding.describe(shardings)["beit3/encoder/layers_0/ffn/A/fc1/kernel"] == str(
      jax.sharding.PartitionSpec(None, "tensor"))


@pytest.mark.slow  # a compile-only check of the step's collectives
def test_fsdp_text_embedding_sums_its_gradient_over_data_only(start):
  """Under FSDP the text embedding's table is split along its width. Left alone, XLA's partitioner gathered every
  device's token rows at full width for the lookup's gradient; gathering the table first costs the table (and an
  all-reduce of its whole gradient) in every step. Each device now looks up its share of the width for its data
  group's ids: the table's gradient is reduced over `data` only, one width shard of it, and no token row or
  whole table is gathered."""
  from benchmarks import train_compile
  config, _ = start
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices())
  tx, shards, rules, _, step, batch_sh = _setup(config, TRAINABLE, mesh)
  shapes = state_layout(config, TRAINABLE, tx, mesh, rules)[0]
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in random_batch(config, images=8, prompts=2, mask_size=48, seed=4).items()}
  with sharding.activate(mesh, rules):
    hlo = step.lower(state, batch).compile().as_text()
  every = train_compile.largest_collectives(hlo, 8, n=10_000)
  assert not [c for c in every if c["op"] == "all-gather" and "/text_embed/" in c["source"]], every
  v, d = config.beit3.vocab_size, config.beit3.embed_dim
  assert not [c for c in every if f"[{v},{d}]" in c["shape"]], every  # the whole table, or its whole gradient
  # Its width shard's gradient, summed over the 2 data groups (XLA may combine it with other gradients).
  assert [c["group"] for c in every if f"f32[{v},{d // 4}]" in c["shape"]] == [2], every


def test_evaluation_under_training_fsdp_keeps_each_image_on_its_devices(start):
  """Evaluation inside training runs under the training mesh and rules, with the parameters as FSDP split them.
  The evaluator maps its per-image model over the images (`layers.batch_vmap`): the images stay split over all
  the batch axes and each image's prompts stay whole. A plain vmap put the rules' batch split on the prompts
  instead, and XLA moved images, text ids and decoder inputs across all 8 devices ("involuntary full
  rematerialization"). The weights are split over fsdp (4 devices), so a collective over all 8 can only move
  examples. The logits equal the one-device step's."""
  from benchmarks import train_compile
  from evf_jax import evaluate
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg, params = start
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices()[:8])
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  shards, _ = sharding.param_shardings(abstract_params(cfg, boxed=True), mesh, rules)
  spec = evaluate.batch_spec(8, 4, 16, 64, sam_size=cfg.sam.img_size, beit_size=cfg.beit3.img_size,
                             low_res=cfg.sam.low_res_size)
  rng = np.random.default_rng(0)
  batch = {k: (rng.integers(0, 300, v.shape) if k == "input_ids" else rng.random(v.shape) * 255 if k == "sam_image"
               else rng.random(v.shape) > 0.2 if v.dtype == np.bool_ else rng.random(v.shape)).astype(v.dtype)
           for k, v in spec.items()}
  batch["resize_hw"][:] = cfg.sam.img_size
  predict = evaluate.evf_predict_fn(cfg)
  expected = np.asarray(jax.jit(predict)(params, batch))

  data = sharding.batch_sharding(mesh, rules)
  placed = jax.device_put(params, shards), jax.device_put(batch, data)
  with sharding.activate(mesh, rules):
    compiled = jax.jit(predict, out_shardings=data).lower(*placed).compile()
    logits = np.asarray(compiled(*placed))
  every = train_compile.largest_collectives(compiled.as_text(), 8, n=10_000)
  assert every and not [c for c in every if c["group"] == 8], [c for c in every if c["group"] == 8]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
