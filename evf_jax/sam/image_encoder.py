"""SAM's image encoder: a ViTDet-style ViT with windowed and global attention, decomposed relative-position
bias and a convolutional neck. Mirrors `segment_anything/modeling/image_encoder.py`; NHWC throughout.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from evf_jax import layers

Dtype = Any


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """(B, H, W, C) -> (B * nh * nw, window, window, C), zero-padding H and W at the bottom/right up to
  multiples of `window`. Returns the padded (Hp, Wp) too."""
  b, h, w, c = x.shape
  pad_h, pad_w = -h % window, -w % window
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # NHWC: H then W
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """The inverse of `window_partition`, dropping the padding."""
  hp, wp = padded_hw
  h, w = hw
  b = x.shape[0] // ((hp // window) * (wp // window))
  x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, hp, wp, -1)
  return x[:, :h, :w, :] if (hp > h or wp > w) else x


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
  try:
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    return cudnn_attention(q, k, v, scale=scale)
  except (ImportError, TypeError, ValueError, NotImplementedError, RuntimeError):
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
  """softmax(logits) @ v over the last axis of logits (B, N, T, S) and v (B, N, S, D) -> (B, T, N, D).

  The normalisation is applied to the (T, D) product instead of the (T, S) probabilities: one pass
  over the logits less (ViT-B global attention on 2 cores: 0.94 s -> 0.73 s).
  """
  m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  e = jnp.exp(logits - m)
  out = jnp.einsum("bnts,bnsd->bntd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / e.sum(axis=-1, keepdims=True)
  return out.astype(v.dtype).transpose(0, 2, 1, 3)


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
    slicing it made XLA gather every image's q, k and v onto every device. The step size counts the whole
    batch, so a device's share of a step is smaller than `max_chunk_bytes` on a mesh.
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
  rows = max(1, min(h, (max_chunk_bytes or default_bytes) // (b * g * w * t * 4)))
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


def block_attention(qkv: jax.Array, qkv_bias: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, *,
                    num_heads: int, window_size: int, attention_impl: Optional[str]) -> jax.Array:
  """Everything between a block's qkv and proj Linear layers: (B, H, W, 3 * C) -> (B, H, W, C).

  Windowed (window_size > 0): the grid is padded to whole windows, partitioned, attended per window and
  merged back. The reference pads the block's input with zeros and runs qkv on the padding too; here qkv ran
  on the real tokens only (4096 instead of 4900 at 1024 px) and the padding takes qkv(0), i.e. `qkv_bias`;
  proj runs after the merge, on the real tokens only too (the reference drops the padding after it).
  One function, so that `benchmarks/` can swap in kernels that take the whole grid at once.
  """
  _, h, w, c3 = qkv.shape
  dim = c3 // 3
  hd = dim // num_heads
  ws = window_size
  if ws > 0:
    pad_h, pad_w = -h % ws, -w % ws
    if pad_h or pad_w:
      qkv = jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
      real = np.pad(np.ones((h, w, 1), bool), ((0, pad_h), (0, pad_w), (0, 0)))
      qkv = jnp.where(real, qkv, qkv_bias.astype(qkv.dtype))
    qkv, padded = window_partition(qkv, ws)
  grid = (ws, ws) if ws > 0 else (h, w)
  # torch splits the fused output as (3, heads, head_dim).
  qkv = qkv.reshape(qkv.shape[0], grid[0] * grid[1], 3, num_heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if attention_impl == "cudnn":
    out = cudnn_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, grid)
  else:
    out = rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, grid)
  out = out.reshape(-1, *grid, dim)
  return window_unpartition(out, ws, padded, (h, w)) if ws > 0 else out


class Attention(nn.Module):
  """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative-position bias, within
  non-overlapping windows of `window_size` when > 0 (else global). The rel-pos tables are sized for the
  window, or for `input_size` when global."""
  dim: int
  num_heads: int
  input_size: tuple[int, int]  # the grid a global block's rel-pos tables are sized for
  window_size: int = 0
  attention_impl: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hd = self.dim // self.num_heads
    qkv_layer = layers.dense(3 * self.dim, ("embed", "heads"), name="qkv", dtype=self.dtype,
                             param_dtype=self.param_dtype)
    qkv = qkv_layer(x)
    table = lambda n, size: self.param(  # noqa: E731
        n, layers.logical(nn.initializers.zeros_init(), (None, None)), (2 * size - 1, hd), self.param_dtype)
    ws = self.window_size
    table_hw = (ws, ws) if ws > 0 else tuple(self.input_size)
    rel_pos_h = table("rel_pos_h", table_hw[0])
    rel_pos_w = table("rel_pos_w", table_hw[1])
    qkv_bias = nn.unbox(qkv_layer.variables["params"]["bias"])  # qkv(0): what the windows' padding holds
    out = block_attention(qkv, qkv_bias, rel_pos_h, rel_pos_w, num_heads=self.num_heads, window_size=ws,
                          attention_impl=self.attention_impl)
    return layers.dense(self.dim, ("heads", "embed"), name="proj", dtype=self.dtype,
                        param_dtype=self.param_dtype)(out)


class MLPBlock(nn.Module):
  """Linear -> activation -> Linear (`common.MLPBlock`); exact GELU in the ViT, ReLU in the decoder."""
  dim: int
  mlp_dim: int
  activation: str = "gelu"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(self.mlp_dim, ("embed", "mlp"), name="lin1", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    x = layers.gelu(x) if self.activation == "gelu" else nn.relu(x)
    return layers.dense(self.dim, ("mlp", "embed"), name="lin2", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)


class Block(nn.Module):
  """Pre-LN transformer block; attention is windowed when `window_size > 0`, else global."""
  dim: int
  num_heads: int
  mlp_ratio: float
  window_size: int
  input_size: tuple[int, int]  # the grid the global block's rel-pos tables are sized for
  attention_impl: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shortcut = x
    x = layers.layer_norm(1e-6, name="norm1", **kw)(x)
    x = Attention(self.dim, self.num_heads, self.input_size, window_size=self.window_size,
                  attention_impl=self.attention_impl, name="attn", **kw)(x)
    x = shortcut + x
    y = layers.layer_norm(1e-6, name="norm2", **kw)(x)
    return x + MLPBlock(self.dim, int(self.dim * self.mlp_ratio), name="mlp", **kw)(y)


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.PatchConv(self.embed_dim, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="proj")(x)


class ImageEncoderViT(nn.Module):
  """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, prompt_embed_dim) embeddings."""
  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
  attention_impl: Optional[str] = None
  remat: bool = False  # recompute block activations in the backward pass (saves memory when fine-tuning)
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    grid = self.img_size // self.patch_size
    x = PatchEmbed(self.embed_dim, self.patch_size, name="patch_embed", **kw)(x)
    pos = self.param("pos_embed", layers.logical(nn.initializers.zeros_init(), (None, None, None, "embed")),
                     (1, grid, grid, self.embed_dim), self.param_dtype)
    if pos.shape[1:3] != x.shape[1:3]:
      raise ValueError(f"image grid {x.shape[1:3]} differs from the pos_embed grid {pos.shape[1:3]}; "
                       f"inputs must be padded to {self.img_size}x{self.img_size}")
    x = x + pos.astype(x.dtype)
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      ws = 0 if i in self.global_attn_indexes else self.window_size
      x = block_cls(self.embed_dim, self.num_heads, self.mlp_ratio, ws, (grid, grid),
                    attention_impl=self.attention_impl, name=f"blocks_{i}", **kw)(x)
    # Neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (channels last, so plain LayerNorm over C).
    x = layers.conv(self.out_chans, (1, 1), use_bias=False, in_axis="embed", out_axis=None,
                    name="neck_0", **kw)(x)
    x = layers.layer_norm(1e-6, axis_name="norm", name="neck_1", **kw)(x)
    x = layers.conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, in_axis=None,
                    out_axis=None, name="neck_2", **kw)(x)
    return layers.layer_norm(1e-6, axis_name="norm", name="neck_3", **kw)(x)
