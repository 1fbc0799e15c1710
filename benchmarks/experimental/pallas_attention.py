"""EXPERIMENT, not used by the model: SAM's attention blocks as Pallas (Triton) kernels that read q, k and v
straight from the fused qkv output and add the decomposed rel-pos bias themselves.

Why: the cuDNN path (`image_encoder.cudnn_rel_pos_attention`) copies q and v out of qkv, builds q_ext (q and
its rel-pos scores) and k_ext (k and one-hot row/column indicators) in memory, and runs the flash kernel on
those folded widths (SAM-H: 208 for the global blocks, 112 for the windows); the windows add a pad/partition
copy before and a merge copy after. By `benchmarks/experimental/gpu_static.py` that is ~40 GB of the encoder's traffic
at batch 8, and 6.27 TFLOP of attention where QK and PV at head dim 80 are 3.9. Here:
  - QK and PV run at the head dim, split into powers of two (80 = 64 + 16: Triton's tiles are powers of two);
  - the rel-pos terms come from one product of q with both tables, (.., N, L) per token. The global kernel
    gathers each query's terms from it with indexed loads; the windowed kernel gathers each query's terms
    against the window's key rows and columns once and selects each logit's pair by a product with the
    keys' one-hot rows (K = 32 for 14 x 14 windows);
  - global blocks (`global_rel_pos_attention`): a key block is one grid row;
  - windowed blocks (`windowed_rel_pos_attention`): each program takes a block of one window's queries from
    the unpartitioned grid by gathered loads, its keys likewise (the padding beyond the grid holds qkv's bias,
    as in the reference), and scatters its output rows back to the grid: no partition or merge copies.
Whether they beat cuDNN is a GPU question (`gpu_encoder.py` times both ways and profiles the encoder with
`--impls cudnn+pallas`); on CPU they run in Pallas's interpreter, which tests their arithmetic only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from evf_jax.sam import rel_pos_attention as rpa


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


def rel_pos_width(window: int) -> int:
  """The K of the windowed kernel's rel-pos product: a window's key rows and key columns, each side padded
  to a power of two >= 8 (so K >= 16, Triton's least): 32 for SAM's 14 x 14 windows."""
  return 2 * pl.next_power_of_2(max(window, 8))


def rel_pos_scores(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """(..., N, L) products of each query (..., N, D) with every row of the h table then the w table of an
  (h, w) attention grid (L = 2h - 1 + 2w - 1 rounded up to a power of two): the kernels gather each (query,
  key) pair's rel-pos logits from these."""
  h, w = hw
  th, tw = rpa.rel_pos_table(h, h, rel_pos_h), rpa.rel_pos_table(w, w, rel_pos_w)
  tables = jnp.concatenate([th, tw]).astype(q.dtype)
  tables = jnp.pad(tables, ((0, pl.next_power_of_2(tables.shape[0]) - tables.shape[0]), (0, 0)))
  return jnp.einsum("...nd,jd->...nj", q, tables, preferred_element_type=q.dtype)


def _dot_t(a, b_t):
  """a (M, K) @ b_t (N, K)^T in float32."""
  return jax.lax.dot_general(a, b_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _global_kernel(q_ref, k_ref, v_ref, s_ref, o_ref, *, scale, grid_hw, pieces, block_q):
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

  def body(ky, carry):
    outs, m, l = carry
    keys = pl.ds(ky * w, w)
    s = sum(_dot_t(qp, k_ref[keys, pl.ds(st, n)]) for qp, (st, n) in zip(qs, pieces)) * scale
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
                             hw: tuple[int, int], block_q: int = 128, num_warps: int = 8, num_stages: int = 2,
                             interpret: bool = False) -> jax.Array:
  """SAM's global attention from the fused qkv output (B, h * w, 3 * N * D) -> (B, h * w, N, D).

  Key blocks are grid rows, so w must be a power of two >= 16 (64 at 1024 px); block_q must divide h * w.
  Defaults: at SAM-H's sizes, 128 queries on 4 warps spill registers (255 used, by ptxas for sm_90a:
  `gpu_static.py --ptxas`); on 8 warps they take 163 and spill nothing.
  """
  b, t, c = qkv.shape
  h, w = hw
  d = c // (3 * num_heads)
  if t != h * w or w & (w - 1) or w < 16 or t % block_q:
    raise NotImplementedError(f"grid {hw} with block_q {block_q}: key rows must be a power of two >= 16 wide "
                              f"and block_q must divide the {h * w} tokens")
  pieces = split_pow2(d)
  qkv5 = qkv.reshape(b, t, 3, num_heads, d)
  q = qkv5[:, :, 0]
  scores = rel_pos_scores(q, rel_pos_h, rel_pos_w, hw)
  kernel = functools.partial(_global_kernel, scale=d ** -0.5, grid_hw=hw, pieces=pieces, block_q=block_q)
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


def _window_kernel(q_ref, k_ref, v_ref, s_ref, b_ref, o_ref, *, scale, grid_hw, ws, pieces, block_q, block_k,
                   query_blocks, windows_x):
  """One (window x query block, image, head). q_ref, k_ref, v_ref, o_ref: the (H, W, D) planes of the grid;
  s_ref (H, W, L): each token's `rel_pos_scores` against the window tables; b_ref (3, D): qkv's bias, what
  the grid's padding holds. Window-local token l sits at (l // ws, l % ws); its logit for key m gains
  s[l, l_y - m_y + ws - 1] + s[l, (2 ws - 1) + l_x - m_x + ws - 1].

  Those two terms are gathered once per query, against every key row and key column of the window (rel_q,
  `rel_pos_width` columns), and each key block picks its pair by a product with its keys' one-hot rows: an
  exact selection on the tensor cores instead of two gathered loads per logit in every key block.

  Query lanes past the window's last token, or on its padding (outside the grid), are made copies of a real
  token of the same window (position and rel-pos coordinates clamped alike): they compute that token's row
  exactly, so the unmasked scatter of the output writes each grid row with one value, however often."""
  h, w = grid_hw
  f32 = jnp.float32
  window, qb = pl.program_id(0) // query_blocks, pl.program_id(0) % query_blocks
  wy, wx = window // windows_x, window % windows_x

  local = jnp.minimum(qb * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0), ws * ws - 1)
  qgy = jnp.minimum(wy * ws + local // ws, h - 1)
  qgx = jnp.minimum(wx * ws + local % ws, w - 1)
  qy, qx = qgy - wy * ws, qgx - wx * ws
  qs = [q_ref[qgy, qgx, pl.ds(st, n)] for st, n in pieces]
  half = rel_pos_width(ws) // 2  # columns [0, half): key rows 0..ws-1; [half, 2 half): key columns
  j = jax.lax.broadcasted_iota(jnp.int32, (block_q, 2 * half), 1)
  col = jnp.where(j < half, qy[:, None] - j + (ws - 1), (2 * ws - 1) + qx[:, None] - (j - half) + (ws - 1))
  col = jnp.clip(col, 0, s_ref.shape[-1] - 1)  # the columns past ws meet zeros in the one-hot rows
  rel_q = s_ref[jnp.broadcast_to(qgy[:, None], col.shape), jnp.broadcast_to(qgx[:, None], col.shape), col]

  def body(kb, carry):  # the window's keys, block_k at a time
    outs, m, l = carry
    key = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    inside = key < ws * ws  # lanes past the window's last key are masked out of the softmax
    key = jnp.minimum(key, ws * ws - 1)
    ky, kx = key // ws, key % ws  # window-local: padding keys keep their place for the rel-pos terms
    gy, gx = wy * ws + ky, wx * ws + kx
    real = ((gy < h) & (gx < w))[:, None]  # else padding: k and v are qkv's bias there
    gy, gx = jnp.minimum(gy, h - 1), jnp.minimum(gx, w - 1)
    s = sum(_dot_t(qp, jnp.where(real, k_ref[gy, gx, pl.ds(st, n)], b_ref[1, pl.ds(st, n)][None, :]))
            for qp, (st, n) in zip(qs, pieces)) * scale
    jk = jax.lax.broadcasted_iota(jnp.int32, (block_k, 2 * half), 1)
    onehot = ((jk == ky[:, None]) | (jk == kx[:, None] + half)).astype(rel_q.dtype)
    s = jnp.where(inside[None, :], s + _dot_t(rel_q, onehot), -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(axis=-1)
    pv = p.astype(v_ref.dtype)
    outs = [o * corr[:, None] + jnp.dot(pv, jnp.where(real, v_ref[gy, gx, pl.ds(st, n)],
                                                      b_ref[2, pl.ds(st, n)][None, :]),
                                        preferred_element_type=f32)
            for o, (st, n) in zip(outs, pieces)]
    return outs, m_new, l

  outs = [jnp.zeros((block_q, n), f32) for _, n in pieces]
  m = jnp.full((block_q,), -jnp.inf, f32)
  l = jnp.zeros((block_q,), f32)
  outs, m, l = jax.lax.fori_loop(0, -(-ws * ws // block_k), body, (outs, m, l))
  for o, (st, n) in zip(outs, pieces):  # scattered back to the grid (all-array indices)
    shape = (block_q, n)
    cols = st + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    o_ref[jnp.broadcast_to(qgy[:, None], shape), jnp.broadcast_to(qgx[:, None], shape), cols] = (
        (o / l[:, None]).astype(o_ref.dtype))


@functools.partial(jax.jit, static_argnames=("num_heads", "window", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def windowed_rel_pos_attention(qkv: jax.Array, qkv_bias: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                               *, num_heads: int, window: int, block_q: int = 64, block_k: int = 64,
                               num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
  """SAM's windowed attention from the unpartitioned fused qkv output (B, H, W, 3 * N * D) -> (B, H, W, N, D),
  the grid padded to whole windows with `qkv_bias` (3 * N * D,) as the reference's zero padding gives."""
  b, h, w, c = qkv.shape
  d = c // (3 * num_heads)
  pieces = split_pow2(d)
  if h < window or w < window:
    raise NotImplementedError(f"grid {(h, w)} smaller than one {window} x {window} window")
  for size in (block_q, block_k):
    if size < 16 or size & (size - 1):
      raise NotImplementedError(f"block size {size}: a power of two >= 16")
  qkv6 = qkv.reshape(b, h, w, 3, num_heads, d)
  scores = rel_pos_scores(qkv6[:, :, :, 0], rel_pos_h, rel_pos_w, (window, window))  # (B, H, W, N, L)
  windows_x = -(-w // window)
  query_blocks = -(-window * window // block_q)
  kernel = functools.partial(_window_kernel, scale=d ** -0.5, grid_hw=(h, w), ws=window, pieces=pieces,
                             block_q=block_q, block_k=block_k, query_blocks=query_blocks, windows_x=windows_x)
  plane = lambda part: pl.BlockSpec((None, h, w, None, None, d), lambda i, j, n: (j, 0, 0, part, n, 0))  # noqa: E731
  return pl.pallas_call(
      kernel,
      grid=(-(-h // window) * windows_x * query_blocks, b, num_heads),
      in_specs=[plane(0), plane(1), plane(2),
                pl.BlockSpec((None, h, w, None, scores.shape[-1]), lambda i, j, n: (j, 0, 0, n, 0)),
                pl.BlockSpec((3, None, d), lambda i, j, n: (0, n, 0))],
      out_specs=pl.BlockSpec((None, h, w, None, d), lambda i, j, n: (j, 0, 0, n, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, w, num_heads, d), qkv.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"sam_windowed_rel_pos_attention_w{window}",  # benchmarks/gpu_static.py reads the window here
  )(qkv6, qkv6, qkv6, scores, qkv_bias.astype(qkv.dtype).reshape(3, num_heads, d))


def _tiles(tiles: dict, prefix: str) -> dict:
  """The keyword arguments of one kernel from `with_pallas`'s tiles: global_block_q -> block_q, ..."""
  return {k[len(prefix):]: v for k, v in tiles.items() if k.startswith(prefix)}


def with_pallas(block_attention, kinds=("global", "windowed"), interpret: bool = False, strict: bool = False,
                **tiles):
  """A stand-in for `image_encoder.block_attention` that sends the blocks of `kinds` these kernels take to
  them (`tiles`: global_block_q, global_num_warps, window_block_q, window_num_warps; the kernels' defaults
  otherwise) and everything else to `block_attention`.
  strict: a block of `kinds` that the kernels do not tile raises NotImplementedError instead."""
  known = {f"global_{k}" for k in ("block_q", "num_warps", "num_stages")} | {
      f"window_{k}" for k in ("block_q", "block_k", "num_warps", "num_stages")}
  if set(tiles) - known:
    raise TypeError(f"unknown tiles {sorted(set(tiles) - known)}; known: {sorted(known)}")

  def attention(qkv, qkv_bias, rel_pos_h, rel_pos_w, *, num_heads, window_size, attention):
    def fallback():
      return block_attention(qkv, qkv_bias, rel_pos_h, rel_pos_w, num_heads=num_heads, window_size=window_size,
                             attention=attention)
    b, h, w, c = qkv.shape
    kind = "windowed" if window_size > 0 else "global"
    if kind not in kinds:
      return fallback()
    try:
      if kind == "global":
        out = global_rel_pos_attention(qkv.reshape(b, h * w, c), rel_pos_h, rel_pos_w, num_heads=num_heads,
                                       hw=(h, w), interpret=interpret, **_tiles(tiles, "global_"))
      else:
        out = windowed_rel_pos_attention(qkv, qkv_bias, rel_pos_h, rel_pos_w, num_heads=num_heads,
                                         window=window_size, interpret=interpret, **_tiles(tiles, "window_"))
    except NotImplementedError:  # a grid or head dim these kernels do not tile
      if strict:
        raise
      return fallback()
    return out.reshape(b, h, w, c // 3)
  return attention
