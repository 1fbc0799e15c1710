"""EXPERIMENT, not used by the model: SAM's global-block attention as one Pallas (Triton) kernel that reads
q, k and v straight from the fused qkv output and adds the decomposed rel-pos bias itself.

Why: on the cuDNN path (`image_encoder.cudnn_rel_pos_attention`) a global block of SAM-H copies q and v out
of qkv, builds q_ext (80 + 128 rel-pos scores) and k_ext (80 + 128 one-hot columns) in memory, and runs the
flash kernel at head dim 208 for QK: 6.27 of the encoder's attention TFLOP at batch 8 are on folded widths,
and ~1.2 GB per global block is spent building them (`benchmarks/gpu_static.py`). Here the kernel does QK and
PV at head dim 80 (as a 64 + 16 split: Triton's tiles are powers of two). The rel-pos terms come from one
product of q with both tables, (B, T, N, 256), from which the kernel gathers each query's terms with
indexed loads: a key block is one grid row, so its rel_h term is one value per query and its rel_w term the
same (queries x 64) tile for every row.
Whether it beats cuDNN is a GPU question (`gpu_encoder.py`'s attention section times it against the folded
cuDNN call when it is importable); on CPU it runs in Pallas's interpreter, which tests its arithmetic only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from evf_jax.sam import image_encoder as ie


def split_pow2(d: int, smallest: int = 16) -> list[tuple[int, int]]:
  """(start, size) pieces of a width, each a power of two >= `smallest` (Triton's dot needs K >= 16):
  80 -> [(0, 64), (64, 16)]. Raises NotImplementedError for widths that do not split so (e.g. 72)."""
  pieces, start = [], 0
  for bit in reversed(range(d.bit_length())):
    size = 1 << bit
    if d - start >= size:
      if size < smallest:
        raise NotImplementedError(f"head dim {d} does not split into powers of two >= {smallest}")
      pieces.append((start, size))
      start += size
  return pieces


def rel_pos_scores(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                   hw: tuple[int, int]) -> jax.Array:
  """(B, T, N, L) products of each query with every row of the h table then the w table (L = 2h - 1 + 2w - 1
  rounded up to a power of two): the kernel gathers each query's rel-pos logits from these itself."""
  h, w = hw
  th, tw = ie.rel_pos_table(h, h, rel_pos_h), ie.rel_pos_table(w, w, rel_pos_w)
  tables = jnp.concatenate([th, tw]).astype(q.dtype)
  tables = jnp.pad(tables, ((0, pl.next_power_of_2(tables.shape[0]) - tables.shape[0]), (0, 0)))
  return jnp.einsum("btnd,jd->btnj", q, tables, preferred_element_type=q.dtype)


def _kernel(q_ref, k_ref, v_ref, s_ref, o_ref, *, scale, grid_hw, pieces, block_q):
  """One (query block, image, head): q_ref (block_q, D); k_ref, v_ref (T, D); s_ref (block_q, L), the
  query block's `rel_pos_scores`; o_ref (block_q, D). Online softmax over the h key rows, w keys each.
  Query i of the block sits at grid (y_i, x_i); its logit for key (ky, kx) gains
  s[i, y_i - ky + h - 1] + s[i, (2h - 1) + x_i - kx + w - 1], read from s_ref by gathered loads."""
  h, w = grid_hw
  f32 = jnp.float32
  qs = [q_ref[:, pl.ds(st, n)] for st, n in pieces]
  token = pl.program_id(0) * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  y, x = token // w, token % w
  rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, w), 0)
  kx = jax.lax.broadcasted_iota(jnp.int32, (block_q, w), 1)
  rel_w = s_ref[rows, (2 * h - 1) + x[:, None] - kx + (w - 1)].astype(f32)  # (block_q, w), every key row
  query = jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)

  def dot(a, b_t):  # a (M, K) @ b_t (N, K)^T in float32
    return jax.lax.dot_general(a, b_t, (((1,), (1,)), ((), ())), preferred_element_type=f32)

  def body(ky, carry):
    outs, m, l = carry
    keys = pl.ds(ky * w, w)
    s = sum(dot(qp, k_ref[keys, pl.ds(st, n)]) for qp, (st, n) in zip(qs, pieces)) * scale
    rel_h = s_ref[query, y - ky + (h - 1)].astype(f32)  # (block_q,): this key row's term
    s = s + rel_h[:, None] + rel_w
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(axis=-1)
    pv = p.astype(v_ref.dtype)
    outs = [o * corr[:, None] + jnp.dot(pv, v_ref[keys, pl.ds(st, n)], preferred_element_type=f32)
            for o, (st, n) in zip(outs, pieces)]
    return outs, m_new, l

  outs = [jnp.zeros((block_q, n), f32) for _, n in pieces]
  m = jnp.full((block_q,), -jnp.inf, f32)
  l = jnp.zeros((block_q,), f32)
  outs, m, l = jax.lax.fori_loop(0, h, body, (outs, m, l))
  for o, (st, n) in zip(outs, pieces):
    o_ref[:, pl.ds(st, n)] = (o / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_heads", "hw", "block_q", "num_warps", "num_stages",
                                             "interpret"))
def global_rel_pos_attention(qkv: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, *, num_heads: int,
                             hw: tuple[int, int], block_q: int = 128, num_warps: int = 4, num_stages: int = 2,
                             interpret: bool = False) -> jax.Array:
  """SAM's global attention from the fused qkv output (B, h * w, 3 * N * D) -> (B, h * w, N, D).

  Key blocks are grid rows, so w must be a power of two >= 16 (64 at 1024 px); block_q must divide h * w.
  """
  b, t, c = qkv.shape
  h, w = hw
  d = c // (3 * num_heads)
  if t != h * w or w & (w - 1) or w < 16 or t % block_q:
    raise NotImplementedError(f"grid {hw} with block_q {block_q}: key rows must be a power of two >= 16 wide")
  pieces = split_pow2(d)
  qkv5 = qkv.reshape(b, t, 3, num_heads, d)
  q = qkv5[:, :, 0]
  scores = rel_pos_scores(q, rel_pos_h, rel_pos_w, hw)
  kernel = functools.partial(_kernel, scale=d ** -0.5, grid_hw=hw, pieces=pieces, block_q=block_q)
  return pl.pallas_call(
      kernel,
      grid=(t // block_q, b, num_heads),
      in_specs=[
          pl.BlockSpec((None, block_q, None, None, d), lambda i, j, n: (j, i, 0, n, 0)),  # q
          pl.BlockSpec((None, t, None, None, d), lambda i, j, n: (j, 0, 1, n, 0)),        # k
          pl.BlockSpec((None, t, None, None, d), lambda i, j, n: (j, 0, 2, n, 0)),        # v
          pl.BlockSpec((None, block_q, None, scores.shape[-1]), lambda i, j, n: (j, i, n, 0)),  # scores
      ],
      out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, j, n: (j, i, n, 0)),
      out_shape=jax.ShapeDtypeStruct((b, t, num_heads, d), qkv.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sam_global_rel_pos_attention",
  )(qkv5, qkv5, qkv5, scores)


def with_global_blocks(cudnn_attention, block_q: int = 128, num_warps: int = 4, num_stages: int = 2,
                       interpret: bool = False):
  """A stand-in for `image_encoder.cudnn_rel_pos_attention` that sends grids this kernel takes (global
  blocks) to it and everything else (the 14 x 14 windows) to `cudnn_attention`. q, k, v are the slices of
  the fused qkv output; stacking them back is a no-op that XLA folds away (gpu_static shows no copy)."""
  def attention(q, k, v, rel_pos_h, rel_pos_w, hw):
    b, t, n, d = q.shape
    w = hw[1]
    try:
      split_pow2(d)
    except NotImplementedError:
      return cudnn_attention(q, k, v, rel_pos_h, rel_pos_w, hw)
    if w < 16 or w & (w - 1) or t % block_q:
      return cudnn_attention(q, k, v, rel_pos_h, rel_pos_w, hw)
    qkv = jnp.stack([q, k, v], axis=2).reshape(b, t, 3 * n * d)
    return global_rel_pos_attention(qkv, rel_pos_h, rel_pos_w, num_heads=n, hw=tuple(hw), block_q=block_q,
                                    num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  return attention
