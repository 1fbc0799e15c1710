"""SAM-2's memory attention: the current frame's image embedding attends to itself and to the memories of
earlier frames (and their object pointers). Mirrors `sam2/modeling/memory_attention.py` and `RoPEAttention`
(`sam2/modeling/sam/transformer.py`); tokens are (B, L, C).

The memory is a fixed-shape buffer with a key mask (`key_mask`, True = a real memory), so a tracker can keep it
in a `lax.scan` carry: masked keys get zero weight, which equals leaving them out up to float32 summation
order. The spatial memory tokens (frames of h*w tokens each) are rotated by their position inside their frame;
the object-pointer tokens at the end (`num_k_exclude_rope` of them) are not rotated.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import layers

Dtype = Any


@functools.cache
def axial_rope(dim: int, h: int, w: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (h * w, dim / 2) float32: the rotation angles of 2-D axial RoPE (`compute_axial_cis`).

  Token t sits at column t % w, row t // w. The first dim / 4 complex pairs rotate by column * f_k, the last
  dim / 4 by row * f_k, with f_k = theta^(-4k / dim); all in float32, as the original.
  """
  if dim % 4:
    raise ValueError(f"RoPE needs a head width divisible by 4, got {dim}")
  f32 = np.float32
  freqs = (f32(1.0) / (f32(theta) ** (np.arange(0, dim, 4, dtype=f32)[:dim // 4] / f32(dim)))).astype(f32)
  t = np.arange(h * w, dtype=f32)
  tx, ty = (t % f32(w)).astype(f32), np.floor(t / f32(w)).astype(f32)
  angles = np.concatenate([np.outer(tx, freqs), np.outer(ty, freqs)], axis=1).astype(f32)
  cos, sin = np.cos(angles).astype(f32), np.sin(angles).astype(f32)
  cos.setflags(write=False)
  sin.setflags(write=False)
  return cos, sin


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """(..., L, N, D) heads -> rotated, pairs (2j, 2j + 1) as complex numbers times e^(i angle); cos / sin are
  (L, D / 2). Computed in float32."""
  dt = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = x[..., 0], x[..., 1]
  c, s = cos[:, None, :], sin[:, None, :]
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dt)


class RoPEAttention(nn.Module):
  """Attention with axial RoPE on q and on the keys' first `L_k - num_k_exclude_rope` tokens. The query is a
  square grid (the original takes its side as sqrt(L_q)); keys longer than the query repeat the query's angles
  per memory frame (`rope_k_repeat`)."""
  embedding_dim: int
  num_heads: int
  kv_in_dim: int | None = None
  rope_theta: float = 10000.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, *, num_k_exclude_rope: int = 0, key_mask: jax.Array | None = None):
    c, n = self.embedding_dim, self.num_heads
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    q = layers.dense(c, ("embed", "heads"), name="q_proj", **kw)(q)
    k = layers.dense(c, (None, "heads"), name="k_proj", **kw)(k)
    v = layers.dense(c, (None, "heads"), name="v_proj", **kw)(v)
    b, lq, _ = q.shape
    lk = k.shape[1]
    hd = c // n
    q, k, v = (x.reshape(b, x.shape[1], n, hd) for x in (q, k, v))
    side = math.isqrt(lq)
    if side * side != lq:
      raise ValueError(f"RoPE attention needs a square query grid, got {lq} tokens")
    cos, sin = axial_rope(hd, side, side, self.rope_theta)
    q = rotate(q, cos, sin)
    n_rope = lk - num_k_exclude_rope
    if n_rope:
      if n_rope % lq:
        raise ValueError(f"{n_rope} rotated keys are not a whole number of {lq}-token frames")
      reps = n_rope // lq  # the same angles for every memory frame
      k_rot = rotate(k[:, :n_rope].reshape(b, reps, lq, n, hd), cos, sin).reshape(b, n_rope, n, hd)
      k = jnp.concatenate([k_rot, k[:, n_rope:]], axis=1) if num_k_exclude_rope else k_rot
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = layers.heads_first_attention(q, k, v, key_mask=key_mask).transpose(0, 2, 1, 3)
    return layers.dense(c, ("heads", "embed"), name="out_proj", **kw)(out.reshape(b, lq, c))


class MemoryAttentionLayer(nn.Module):
  """Pre-norm: self-attention (RoPE, no position added), cross-attention to the memory (position added to the
  keys only), ReLU MLP."""
  d_model: int
  mlp_dim: int
  num_heads: int
  kv_in_dim: int
  rope_theta: float = 10000.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory, memory_pos, *, num_k_exclude_rope: int = 0, key_mask=None):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    att = functools.partial(RoPEAttention, self.d_model, self.num_heads, rope_theta=self.rope_theta, **kw)
    y = layers.layer_norm(1e-5, name="norm1", **kw)(x)
    x = x + att(name="self_attn")(y, y, y)
    y = layers.layer_norm(1e-5, name="norm2", **kw)(x)
    x = x + att(kv_in_dim=self.kv_in_dim, name="cross_attn_image")(
        y, memory + memory_pos, memory, num_k_exclude_rope=num_k_exclude_rope, key_mask=key_mask)
    y = layers.layer_norm(1e-5, name="norm3", **kw)(x)
    y = nn.relu(layers.dense(self.mlp_dim, ("embed", "mlp"), name="linear1", **kw)(y))
    return x + layers.dense(self.d_model, ("mlp", "embed"), name="linear2", **kw)(y)


class MemoryAttention(nn.Module):
  d_model: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  kv_in_dim: int
  rope_theta: float = 10000.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, curr, curr_pos, memory, memory_pos, *, num_obj_ptr_tokens: int = 0, key_mask=None):
    """curr, curr_pos (B, L, C): the frame's embedding and its sine encoding; memory, memory_pos (B, M, kv_in);
    key_mask (B, M) or None. Returns (B, L, C)."""
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    x = curr + 0.1 * curr_pos
    for i in range(self.num_layers):
      x = MemoryAttentionLayer(self.d_model, self.mlp_dim, self.num_heads, self.kv_in_dim, self.rope_theta,
                               name=f"layers_{i}", **kw)(x, memory, memory_pos,
                                                         num_k_exclude_rope=num_obj_ptr_tokens, key_mask=key_mask)
    return layers.layer_norm(1e-5, name="norm", **kw)(x)
