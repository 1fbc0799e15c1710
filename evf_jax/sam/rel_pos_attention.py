"""SAM's attention with decomposed relative positions (MViTv2 / ViTDet), computed without a materialised
(T, T) bias: the kernels behind `image_encoder.Attention`.

segment-anything computes `attn = q k^T * scale + rel_h + rel_w` (its `add_decomposed_rel_pos`) and a softmax.
The same numbers are produced here three ways, chosen by `block_attention`'s caller:
  - `rel_pos_attention` (XLA, any backend): small grids fold the rel-pos terms into one product; large grids
    walk heads and grid rows with `lax.map` so the float32 logits stay small;
  - `cudnn_rel_pos_attention` (NVIDIA GPUs, bf16/fp16): the rel-pos terms ride in extended q/k through cuDNN
    flash attention;
  - `decomposed_rel_pos_bias`: the materialised bias, the fallback when cuDNN refuses the extended width.
Each is tested against segment-anything (tests/test_sam_parity.py).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import layers

try:
  # Private: jax's cuDNN wrapper, which (unlike `jax.nn.dot_product_attention`) takes a v narrower than q/k.
  # Used only on the versions it was checked on; anything else takes the public API (`flash_attention_padded_v`).
  if (0, 10) <= jax.__version_info__[:2] <= (0, 11):
    from jax._src.cudnn.fused_attention_stablehlo import (
      dot_product_attention as _cudnn_wide_qk,
    )
  else:
    _cudnn_wide_qk = None
except ImportError:
  _cudnn_wide_qk = None


def rel_pos_table(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """`rel_pos` (L, C) resized linearly along L to 2 * max(q, k) - 1 rows when it has another length
  (half-pixel centres, no antialias, as torch's `F.interpolate(mode="linear")`)."""
  max_dist = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] == max_dist:
    return rel_pos
  return jax.image.resize(rel_pos.astype(jnp.float32), (max_dist, rel_pos.shape[1]),
                          method="linear", antialias=False).astype(rel_pos.dtype)


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
  """(q_size, k_size) static rows of `rel_pos_table` for each (query, key) coordinate pair. Coordinates
  of the shorter side are stretched when q and k differ (never the case inside SAM)."""
  q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel.astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative-position table (q_size, k_size, C) gathered from `rel_pos` (L, C)."""
  return rel_pos_table(q_size, k_size, rel_pos)[rel_pos_index(q_size, k_size)]


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            q_hw: tuple[int, int], k_hw: tuple[int, int]) -> jax.Array:
  """The additive attention bias of MViTv2's decomposed relative positions, materialised.

  q: (B, q_h * q_w, N, D), unscaled. Returns (B, N, q_h * q_w, k_h * k_w). Only the cuDNN path's
  fallback builds it (see `cudnn_rel_pos_attention`); `benchmarks/gpu_encoder.py` times it as a baseline.
  """
  (qh, qw), (kh, kw) = q_hw, k_hw
  rh = get_rel_pos(qh, kh, rel_pos_h)
  rw = get_rel_pos(qw, kw, rel_pos_w)
  b, _, n, d = q.shape
  rq = q.reshape(b, qh, qw, n, d)
  rel_h = jnp.einsum("byxnd,ykd->bnyxk", rq, rh.astype(q.dtype))
  rel_w = jnp.einsum("byxnd,xkd->bnyxk", rq, rw.astype(q.dtype))
  bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, N, qh, qw, kh, kw)
  return bias.reshape(b, n, qh * qw, kh * kw)


def fold_rel_pos(q: jax.Array, k: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                 hw: tuple[int, int], multiple: int = 8, q_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Extends q and k (B, h * w, N, D) so that plain attention with scale D^-0.5 / q_scale on
  (q_ext, k_ext, v) is SAM's attention with the decomposed rel-pos bias.

  q (times q_scale) gains its h + w rel-pos scores times q_scale / D^-0.5 (the kernel's scale multiplies
  that back), k one-hot (row, column) indicators of each key; both are zero-padded to a multiple of
  `multiple` features (cuDNN wants multiples of 8). q_scale = D^-0.5 gives logits q_ext . k_ext.
  On the cuDNN path the point is a fused flash-attention kernel with no (T, T) bias tensor in memory:
  SAM-H's global blocks would otherwise write and read 0.5 GB per image each.
  The scores come from one product of q with both tables, (B, T, N, D) x (Lh + Lw, D), and a static
  gather of each token's rows: no transposed copies of q, which a per-row batched product needs
  (H100, a batch of 8 windowed blocks: ~340 us per block for the batched form).
  """
  b, t, n, d = q.shape
  h, w = hw
  th, tw = rel_pos_table(h, h, rel_pos_h), rel_pos_table(w, w, rel_pos_w)
  # The tables carry the factor that undoes the kernel's scale, so the product comes out final, in q's dtype:
  # a float32 product and a scaling pass cost SAM-H ~6 GB more traffic per batch of 8 (benchmarks/gpu_static.py).
  tables = (jnp.concatenate([th, tw]).astype(jnp.float32) * (q_scale * d ** 0.5)).astype(q.dtype)  # (Lh + Lw, D)
  scores = jnp.einsum("btnd,jd->btnj", q, tables, preferred_element_type=q.dtype)
  # Token s = (y, x) takes rows index_h[y, :] of the h table and Lh + index_w[x, :] of the w table.
  rows = np.concatenate([np.repeat(rel_pos_index(h, h), w, axis=0),
                         th.shape[0] + np.tile(rel_pos_index(w, w), (h, 1))], axis=1)  # (T, h + w)
  rel = jnp.take_along_axis(scores, jnp.asarray(rows, jnp.int32)[None, :, None, :], axis=-1)
  pad = -(d + h + w) % multiple
  zeros = jnp.zeros((b, t, n, pad), q.dtype)
  qs = q if q_scale == 1.0 else q * jnp.asarray(q_scale, q.dtype)
  q_ext = jnp.concatenate([qs, rel, zeros], -1)
  key_row = np.repeat(np.eye(h), w, axis=0)  # (T, h): one-hot row of key s
  key_col = np.tile(np.eye(w), (h, 1))       # (T, w): one-hot column of key s
  onehot = jnp.asarray(np.concatenate([key_row, key_col], -1)[None, :, None, :], k.dtype)
  k_ext = jnp.concatenate([k, jnp.broadcast_to(onehot, (b, t, n, h + w)), zeros], -1)
  return q_ext, k_ext


def flash_attention_wide_qk(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """cuDNN flash attention where q and k have more features than v (B, T, N, *).

  cuDNN 9.10+ on Hopper takes unequal head dims, but `jax.nn.dot_product_attention` requires v's to
  match k's; jax's cuDNN wrapper underneath does not, so it is called directly when it is there. Else
  v is zero-padded to k's width and the output sliced back (SAM-H, H100, batch of 8: 3.43 ms vs 4.03 ms
  for a global block's attention, 0.86 vs 1.04 ms for a windowed one's).
  """
  if _cudnn_wide_qk is None:
    return flash_attention_padded_v(q, k, v, scale)
  try:
    return _cudnn_wide_qk(q, k, v, scale=scale)
  except (TypeError, ValueError, NotImplementedError, RuntimeError):
    # An older or newer jax, an older cuDNN or GPU, or no cuDNN: the same result through the public API.
    return flash_attention_padded_v(q, k, v, scale)


def flash_attention_padded_v(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """`flash_attention_wide_qk` through `jax.nn.dot_product_attention`: v zero-padded to k's width, the
  output sliced back."""
  d = v.shape[-1]
  v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, k.shape[-1] - d)))
  return layers.attention(q, k, v, scale=scale, implementation="cudnn")[..., :d]


def cudnn_rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_pos_h: jax.Array,
                            rel_pos_w: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """SAM's attention on a (h, w) grid through cuDNN flash attention; q, k, v: (B, h * w, N, D).

  The rel-pos terms ride in q and k (`fold_rel_pos`). When the folded width is over what the GPU's cuDNN
  takes (256 on Hopper, 128 before it: SAM-H's global blocks fold to 80 + 128 = 208), the bias is
  materialised as (B, N, T, T) instead.
  """
  q_ext, k_ext = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, hw)
  try:
    return flash_attention_wide_qk(q_ext, k_ext, v, scale=q.shape[-1] ** -0.5)
  except NotImplementedError:
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, hw, hw).astype(q.dtype)
    return layers.attention(q, k, v, bias=bias, implementation="cudnn")


def _attend(logits: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(logits) @ v (`layers.softmax_value`) for logits (B, N, T, S) and v (B, N, S, D) -> (B, T, N, D)."""
  return layers.softmax_value(logits, v).transpose(0, 2, 1, 3)


def default_chunking(platform: Optional[str] = None) -> tuple[Optional[int], int]:
  """(heads per step, bytes of float32 logits per step) for the global attention's `lax.map` on `platform`
  (default: the backend jax runs on); None means all heads. Every step covers all images of the batch.

  On CPU: one head and <= 8 MiB per step (measured on 2 cores, ViT-B global attention, same process):
  - one head per step makes each product, for one image, a plain (512 x 64) @ (64 x 4096) matmul rather than
    a batched one, which XLA's CPU runtime runs slower: 0.63 s -> 0.43 s (with no page faults on either side);
  - steps below glibc's largest mmap threshold (32 MiB) reuse heap memory, while larger buffers are
    mmap-ed and page-faulted afresh on every call (~1.2 us per 4 KiB page here), which cost 0.3-0.7 s.
  A step holds every image of the batch (see `rel_pos_attention`): for one image, as the predictor runs, the
  same products as when a step was one (image, head) map (0.51-0.62 s before, 0.51-0.60 s after, three
  alternating runs); for two on one CPU device the products are batched again and the global block is ~25%
  slower (0.93-1.13 s -> 1.2-1.5 s, 8 or 16 MiB steps alike): the price of keeping the batch whole, which a
  sharded mesh needs.
  On accelerators the steps only need to fit memory; all heads at once and few steps keep the chip busy.
  """
  if (platform or jax.default_backend()) == "cpu":
    return 1, 8 << 20
  return None, 2 << 30


def rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                      hw: tuple[int, int], max_chunk_bytes: Optional[int] = None,
                      heads_per_step: Optional[int] = None) -> jax.Array:
  """softmax(scale * q k^T + rel_h + rel_w) v on a (h, w) grid, without a materialised (T, T) bias.

  q, k, v: (B, h * w, N, D). Two ways, chosen by grid size (timed on 2 CPU cores against passing the
  full bias to `jax.nn.dot_product_attention`):
  - small grids (the 14x14 windows): the rel-pos terms ride inside the QK^T product (`fold_rel_pos`, as
    on the cuDNN path), with q extended by its (h + w) rel-pos scores and k by one-hot (row, column)
    indicators: one matmul with contraction D + h + w and no broadcast passes over the logits (a ViT-B
    window batch: 167 ms -> 103 ms); the scores as one product with both tables and a gather rather than
    per-row products: a ViT-B windowed block 331/334/326 ms -> 325/314/307 ms (three rounds, one process);
  - large grids (global attention, 4096 tokens), heads-major (B, N, T, D): the rel-pos terms are added
    by broadcasting in a (B, g, r, w, h, w) view of the logits, and a `lax.map` walks steps of g heads x r
    grid rows so each step's float32 logits stay under `max_chunk_bytes` (defaults: `default_chunking()`).
    The batch is a dimension of every step, never sliced or folded into the mapped axis: with the batch
    sharded over a mesh (evaluation, training), each device then runs the steps of its own images, where
    slicing it made XLA gather every image's q, k and v onto every device. The step size counts a device's
    share of the batch under the training's logical rules (`layers.batch_shards`; evaluation shards without
    rules and counts the whole batch). Counting the whole batch made the steps as small as one grid
    row on large meshes: compiled for 256 TPU v5e chips with FSDP, the training step then looped 64 times per
    global block, and XLA all-gathered weights of the block in every iteration (docs/performance.md).
  """
  b, t, n, d = q.shape
  h, w = hw
  f32 = jnp.float32
  if h + w <= d:  # small grid: fold the rel-pos terms into one product
    q_ext, k_ext = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, hw, multiple=1, q_scale=d ** -0.5)
    logits = jnp.einsum("btnd,bsnd->bnts", q_ext, k_ext, preferred_element_type=f32)
    return _attend(logits, v.transpose(0, 2, 1, 3))

  rh = get_rel_pos(h, h, rel_pos_h).astype(q.dtype)   # (h, h, D)
  rw = get_rel_pos(w, w, rel_pos_w).astype(q.dtype)   # (w, w, D)
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, N, T, D)
  scale = jnp.asarray(d ** -0.5, q.dtype)
  default_heads, default_bytes = default_chunking()
  g = min(n, heads_per_step or default_heads or n)
  while n % g:
    g -= 1
  per_device = -(-b // layers.batch_shards())
  rows = max(1, min(h, (max_chunk_bytes or default_bytes) // (per_device * g * w * t * 4)))
  while h % rows:
    rows -= 1
  steps = h // rows

  def step(args):  # heads i * g .. (i + 1) * g, grid rows j * rows .. (j + 1) * rows, every image
    qc, i, j = args  # qc: (B, g, rows, w, D), unscaled
    rhc = jax.lax.dynamic_slice_in_dim(rh, j * rows, rows)  # (rows, h, D)
    kc, vc = (jax.lax.dynamic_slice_in_dim(x, i * g, g, axis=1) for x in (kt, vt))  # (B, g, T, D)
    rel_h = jnp.einsum("bnyxd,ykd->bnyxk", qc, rhc, preferred_element_type=f32)
    rel_w = jnp.einsum("bnyxd,xkd->bnyxk", qc, rw, preferred_element_type=f32)
    logits = jnp.einsum("bntd,bnsd->bnts", qc.reshape(b, g, rows * w, d) * scale, kc,
                        preferred_element_type=f32)
    logits = logits.reshape(b, g, rows, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    return _attend(logits.reshape(b, g, rows * w, t), vc)  # (B, rows * w, g, D)

  # Steps run head group-major, then row chunk.
  qc = qt.reshape(b, n // g, g, steps, rows, w, d).transpose(1, 3, 0, 2, 4, 5, 6).reshape(-1, b, g, rows, w, d)
  idx = (jnp.asarray(x.reshape(-1)) for x in np.indices((n // g, steps)))
  out = jax.lax.map(step, (qc, *idx))  # (n/g * steps, B, rows * w, g, D)
  out = out.reshape(n // g, steps, b, rows * w, g, d).transpose(2, 1, 3, 0, 4, 5)  # (B, steps, rows*w, n/g, g, D)
  return out.reshape(b, t, n, d)
