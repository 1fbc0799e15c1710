"""The optimizer against closed forms written here in numpy: the learning-rate schedules, which leaves get weight
decay, and AdamW with global-norm clipping over several steps (docs/training.md#optimizers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from evf_jax.train import optimizer
from evf_jax.train.config import base_config


def _expected_lr(t, peak, total, warmup, schedule, end):
  if t < warmup:
    return peak * t / warmup
  frac = min(1.0, (t - warmup) / (total - warmup))
  if schedule == "linear":
    return peak * (1 - (1 - end) * frac)
  if schedule == "cosine":
    return peak * (end + (1 - end) * 0.5 * (1 + np.cos(np.pi * frac)))
  return peak


@pytest.mark.parametrize("schedule", optimizer.SCHEDULES)
@pytest.mark.parametrize("warmup,end", [(10, 0.0), (0, 0.1), (4, 0.25)])
def test_learning_rate_schedules(schedule, warmup, end):
  """Linear warmup from 0 to the peak, then the decay reaches end_factor * peak exactly at total_steps."""
  peak, total = 3e-4, 40
  lr = optimizer.learning_rate(peak, total_steps=total, warmup_steps=warmup, schedule=schedule, end_factor=end)
  got = np.array([float(lr(t)) for t in range(total + 3)])
  want = np.array([_expected_lr(t, peak, total, warmup, schedule, end) for t in range(total + 3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  if schedule != "constant":
    assert got[total] == pytest.approx(end * peak, rel=1e-6, abs=1e-12)  # float32


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"dense": {"kernel": f(3, 4), "bias": f(4)},
          "conv": {"kernel": f(2, 2, 3, 4)},
          "norm": {"scale": f(4), "bias": f(4)},
          "embed": {"embedding": f(5, 4)},
          "pos_embed": f(1, 6, 4),
          "token": f(1, 1, 4)}


def test_weight_decay_only_on_kernels():
  mask = optimizer.decay_mask(_params())
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert [k for k, v in flat.items() if v] == ["['conv']['kernel']", "['dense']['kernel']"], flat
  # Muon takes the dense matrices only: a conv kernel stays with AdamW
  matrices = jax.tree_util.tree_map_with_path(optimizer.is_matrix, _params())
  assert [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(matrices) if v] == [
      "['dense']['kernel']"]


def _numpy_adamw(params, grads_seq, lr, b1, b2, eps, weight_decay, clip_norm, mask):
  """AdamW as the configs describe it: the gradient clipped to global norm clip_norm, Adam's bias-corrected
  moments, decoupled weight decay on the masked leaves, the step's learning rate lr(t) from t = 0."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads_seq):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    scale = min(1.0, clip_norm / norm) if clip_norm else 1.0
    for k in p:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
      update = m_hat / (np.sqrt(v_hat) + eps) + (weight_decay * p[k] if mask[k] else 0.0)
      p[k] = p[k] - float(lr(t)) * update
  return p


def test_adamw_with_clipping_equals_its_definition():
  """Three steps, the first gradient 1e4 times the others: clipped first, it does not swamp Adam's moments of
  the later steps. The betas, eps, decay and clipping come from a config's optimizer section."""
  c = ml_collections.ConfigDict(dict(base_config().optimizer))
  c.update(weight_decay=0.1, b1=0.8, b2=0.9, eps=1e-3, clip_norm=0.5)
  lr = optimizer.learning_rate(0.05, total_steps=10, warmup_steps=2, schedule="linear")
  tx = optimizer.from_config(c, lr)
  params = {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(np.random.default_rng(2).normal(size=(5,)), jnp.float32)}
  rng = np.random.default_rng(3)
  grads_seq = [{k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()}
               for s in (1e4, 1.0, 0.3)]
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  want = _numpy_adamw(params, grads_seq, lr, c.b1, c.b2, c.eps, c.weight_decay, c.clip_norm,
                      {"kernel": True, "bias": False})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # the clipping and the decay change the result (so the comparison above can tell them apart)
  for other in (dict(clip_norm=0.0), dict(weight_decay=0.0)):
    changed = _numpy_adamw(params, grads_seq, lr, c.b1, c.b2, c.eps, other.get("weight_decay", c.weight_decay),
                           other.get("clip_norm", c.clip_norm), {"kernel": True, "bias": False})
    assert np.abs(changed["kernel"] - want["kernel"]).max() > 1e-4, other
