"""Model-level properties of the Flax SAM that need no reference: logical axis names on every parameter,
remat, reduced-precision compute, jit with cached embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evf_jax.sam import SAM_CONFIGS, Sam, dummy_inputs, init_params

TINY = SAM_CONFIGS["tiny"]


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """These tests check properties, not speed: compile with XLA's optimisations off (about 2x faster)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("name", ["tiny", "vit_h"])
def test_every_param_has_logical_names(name):
  cfg = SAM_CONFIGS[name]
  model = Sam(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(cfg)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == x.value.ndim
    named = [n for n in x.names if n is not None]
    assert len(named) == len(set(named)), x.names  # one mesh axis can't shard two dims
  specs = nn.get_partition_spec(boxed)
  assert jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


@pytest.fixture(scope="module")
def tiny_params():
  return init_params(TINY, jax.random.key(1))


def _inputs(b=2):
  rng = np.random.default_rng(0)
  s = TINY.img_size
  return dict(images=jnp.asarray(rng.normal(size=(1, s, s, 3)), jnp.float32),
              points=(jnp.asarray(rng.uniform(0, s, size=(b, 2, 2)), jnp.float32), jnp.ones((b, 2), jnp.int32)),
              boxes=jnp.asarray([[10, 10, 50, 60]] * b, jnp.float32))


def test_cached_embedding_equals_full_call(tiny_params):
  model = Sam(TINY)
  x = _inputs()
  full = jax.jit(lambda p: model.apply({"params": p}, x["images"], x["points"], x["boxes"], multimask_output=True))
  emb = jax.jit(lambda p: model.apply({"params": p}, x["images"], method=Sam.embed_image))(tiny_params)
  dec = jax.jit(lambda p, e: model.apply({"params": p}, e, x["points"], x["boxes"], multimask_output=True,
                                         method=Sam.decode))
  for a, b in zip(full(tiny_params), dec(tiny_params, emb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_remat_same_values_and_grads(tiny_params):
  x = _inputs()

  def loss(model, p):  # remat only wraps the image encoder's blocks
    return jnp.mean(model.apply({"params": p}, x["images"], method=Sam.embed_image) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(Sam(TINY), p)))(tiny_params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(Sam(TINY, remat=True), p)))(tiny_params)
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5), g0, g1)
  assert float(jnp.abs(g0["image_encoder"]["blocks_0"]["attn"]["rel_pos_h"]).max()) > 0


def test_bfloat16_compute(tiny_params):
  x = _inputs()
  run = lambda model, p: model.apply({"params": p}, x["images"], x["points"], x["boxes"])  # noqa: E731
  f32 = jax.jit(lambda p: run(Sam(TINY), p))(tiny_params)
  lr, iou = jax.jit(lambda p: run(Sam(TINY, dtype=jnp.bfloat16), p))(tiny_params)
  assert lr.dtype == jnp.bfloat16 and jnp.all(jnp.isfinite(lr.astype(jnp.float32)))
  # bf16 keeps ~3 significant digits; only a sanity bound against gross errors (e.g. a wrong cast).
  scale = float(jnp.abs(f32[0]).max())
  assert float(jnp.abs(lr.astype(jnp.float32) - f32[0]).max()) < 0.1 * scale


def test_global_attention_steps_count_a_device_s_share_of_the_batch():
  """The global blocks' `lax.map` sizes its steps by the images one device holds: counting the whole batch made
  one-row steps (64 per block at 1024 px) on large meshes. Here 8 images, 2 heads, a 16 x 16 grid and a budget of
  two rows of the whole batch: 8 steps on one device, 1 step when the batch is split 8 ways; same values."""
  from evf_jax import layers, sharding
  from evf_jax.sam.rel_pos_attention import rel_pos_attention
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  b, n, d, h = 8, 2, 16, 16
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, h * h, n, d), np.float32)) for _ in range(3))
  tables = [jnp.asarray(0.1 * rng.standard_normal((2 * h - 1, d), np.float32)) for _ in range(2)]
  row_bytes = b * n * h * h * h * 4  # float32 logits of one grid row, all heads, the whole batch

  def attend(q, k, v):
    return rel_pos_attention(q, k, v, *tables, (h, h), max_chunk_bytes=2 * row_bytes, heads_per_step=n)

  assert layers.batch_shards() == 1
  alone = jax.make_jaxpr(attend)(q, k, v)
  want = jax.jit(attend)(q, k, v)
  for spec, shards in (([("data", 2), ("fsdp", 4), ("tensor", 1)], 8), ([("data", 2), ("fsdp", 2), ("tensor", 2)], 4)):
    mesh = sharding.make_mesh(spec)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      assert layers.batch_shards() == shards
      on_mesh = jax.make_jaxpr(attend)(q, k, v)
      got = jax.jit(attend)(q, k, v)
    assert _map_steps(on_mesh) == [h // (2 * shards)]  # 2 rows a step per image held, 16 rows in all
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert _map_steps(alone) == [h // 2]


def _map_steps(closed_jaxpr) -> list[int]:
  return [eqn.params["length"] for eqn in closed_jaxpr.eqns if eqn.primitive.name == "scan"]
