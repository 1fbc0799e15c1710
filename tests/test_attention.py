"""`layers.heads_first_attention` (SAM-2's trunk and memory attention) against `jax.nn.dot_product_attention`:
the single pass with the softmax normalised after the value product, and the CPU's streamed key blocks with an
online softmax (key and query lengths that are not multiples of the block, masked keys, a row with every key
masked), values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evf_jax import layers

pytestmark = pytest.mark.usefixtures("fast_compile_unless_slow")  # tiny models: compiling is most of the time


def reference(q, k, v, key_mask=None):
  """(B, N, T, D) through jax's own attention, which takes (B, T, N, D)."""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  heads_second = lambda x: x.transpose(0, 2, 1, 3)
  return heads_second(jax.nn.dot_product_attention(heads_second(q), heads_second(k), heads_second(v), mask=mask))


def inputs(b, n, t, s, d, seed=0, masked=False):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(2 * rng.standard_normal(shape, np.float32)) for shape in ((b, n, t, d), (b, n, s, d),
                                                                                    (b, n, s, d)))
  mask = None
  if masked:
    mask = rng.random((b, s)) < 0.4
    mask[-1] = False  # the last batch row has no key left: every key gets the same weight
    mask = jnp.asarray(mask)
  return q, k, v, mask


def close(got, want, tol):
  """Within `tol` of the largest |want| (float32 summation order: outputs measured <= 9e-7 of it, gradients up to
  2.6e-6 on an AMD EPYC, where jax's own dq was 2.1e-6 off the float64 answer and ours 7e-7)."""
  err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
  assert err <= tol * max(scale, 1.0), (err, scale)


def check(q, k, v, mask, tol=5e-6):
  got = jax.jit(lambda q, k, v: layers.heads_first_attention(q, k, v, key_mask=mask))(q, k, v)
  close(got, reference(q, k, v, mask), tol)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ours = jax.grad(loss(lambda q, k, v: layers.heads_first_attention(q, k, v, key_mask=mask)), argnums=(0, 1, 2))
  theirs = jax.grad(loss(lambda q, k, v: reference(q, k, v, mask)), argnums=(0, 1, 2))
  for a, b in zip(ours(q, k, v), theirs(q, k, v)):
    close(a, b, tol)


@pytest.mark.parametrize("masked", [False, True])
def test_single_pass_equals_jax(masked):
  check(*inputs(2, 3, 10, 7, 8, masked=masked))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("t,s", [(37, 70), (32, 64)])  # with blocks of 16: padded (3 query, 5 key blocks), exact
def test_key_blocks_equal_jax(monkeypatch, masked, t, s):
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 16)
  check(*inputs(2, 2, t, s, 8, seed=1, masked=masked))


def test_bf16_follows_float32():
  q, k, v, mask = inputs(2, 2, 12, 20, 16, seed=2, masked=True)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = layers.heads_first_attention(*half, key_mask=mask)
  assert got.dtype == jnp.bfloat16
  close(got.astype(jnp.float32), reference(q, k, v, mask), 2e-2)


def test_the_cpu_streams_long_keys(monkeypatch):
  """Over 2 blocks of keys the CPU program loops over key blocks; at most 2 it is one pass, no loop."""
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 16)
  hlo = lambda s: jax.jit(layers.heads_first_attention).lower(*inputs(1, 1, 8, s, 4)[:3]).compile().as_text()
  assert "while" in hlo(33) and "while" not in hlo(32)
