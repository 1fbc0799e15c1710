"""Building blocks shared by the SAM and BEiT-3 ports.

Every parameter is created through these helpers so that it carries logical axis names; the
mapping of logical names to mesh axes lives in config (see `evf_jax.sharding`), never in model code.
Activations are constrained at block boundaries with `batch_constraint` (their first axis is "batch").
Parity defaults differ from flax's: torch's GELU is exact and its LayerNorm epsilon is 1e-5, so both
are always passed explicitly.

Logical axis names used for parameters:
  embed   model width (the residual stream)
  mlp     hidden width of feed-forward layers
  heads   fused (num_heads * head_dim) projection width
  vocab   token vocabulary
  conv_h, conv_w   spatial kernel dims (never sharded)
  norm    LayerNorm scale/bias over a non-embed width (e.g. the 256-d SAM neck)

SAM's LayerNorm2d is `layer_norm` applied to an NHWC tensor: the same math over channels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def logical(init: Initializer, names: Sequence[Optional[str]]) -> Initializer:
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, axes: tuple[Optional[str], Optional[str]], *, name: str,
          dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
          use_bias: bool = True,
          kernel_init: Initializer = nn.initializers.lecun_normal()) -> nn.Dense:
  """A 2-D `nn.Dense` (as torch `Linear`) whose kernel is (in, out) with logical names `axes`."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(kernel_init, axes),
      bias_init=logical(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


def layer_norm(epsilon: float, *, name: str, axis_name: Optional[str] = "embed",
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm over the last axis with an explicit epsilon (torch's default is 1e-5, flax's 1e-6).

  Statistics are always computed in float32, whatever `dtype` is.
  """
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=logical(nn.initializers.ones_init(), (axis_name,)),
      bias_init=logical(nn.initializers.zeros_init(), (axis_name,)),
      use_fast_variance=False, force_float32_reductions=True,
      name=name)


def conv(features: int, kernel_size: tuple[int, int], *, name: str,
         strides: tuple[int, int] = (1, 1), padding: Any = "VALID", use_bias: bool = True,
         in_axis: Optional[str] = None, out_axis: Optional[str] = "embed",
         dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """NHWC `nn.Conv`; kernel (kh, kw, in, out), converted from torch's (out, in, kh, kw)."""
  return nn.Conv(
      features, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
      dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(nn.initializers.lecun_normal(), ("conv_h", "conv_w", in_axis, out_axis)),
      bias_init=logical(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


class PatchConv(nn.Module):
  """A conv with stride = kernel = `patch` (a ViT's patch embedding), computed as one matmul over the
  flattened patches; the parameters are a conv's, kernel (kh, kw, in, out) and bias. XLA on an H100 ran
  SAM's 16x16 conv over 3 channels as an implicit GEMM at ~35 TFLOP/s (1.8 ms of a SAM-H batch of 8)."""
  features: int
  patch: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    b, h, w, c = x.shape
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(), ("conv_h", "conv_w", None, "embed")),
                        (p, p, c, self.features), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), ("embed",)), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    gh, gw = h // p, w // p  # as a VALID conv, a remainder is dropped
    patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, gh, gw, p * p * c) @ kernel.reshape(p * p * c, self.features) + bias


class ConvTranspose(nn.Module):
  """torch `ConvTranspose2d(kernel_size=stride, stride=stride, padding=0)`, NHWC: each input pixel becomes its
  own stride x stride block of outputs, so the layer is one matmul and a reshape. The parameters are flax's
  `nn.ConvTranspose(transpose_kernel=True)` ones: kernel (kh, kw, out, in), converted from torch's
  (in, out, kh, kw) by the `conv_transpose2d` transform, and bias. Written out because XLA:CPU runs a
  transposed convolution's gradient through a slow generic path: SAM-B's decoder upscaling for 6 prompts,
  forward + backward on 2 cores, took 10.1 s as a convolution and 0.60 s as this matmul (one run)."""
  features: int
  stride: int
  in_axis: Optional[str] = None
  out_axis: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.stride
    b, h, w, c = x.shape
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(),
                                          ("conv_h", "conv_w", self.out_axis, self.in_axis)),
                        (s, s, self.features, c), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), (self.out_axis,)), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum("bijc,yxoc->biyjxo", x, kernel)  # output pixel (i * s + y, j * s + x)
    return y.reshape(b, h * s, w * s, self.features) + bias


def conv_transpose(features: int, kernel_size: tuple[int, int], *, name: str,
                   strides: tuple[int, int], in_axis: Optional[str] = None,
                   out_axis: Optional[str] = None, dtype: Optional[Dtype] = None,
                   param_dtype: Dtype = jnp.float32) -> ConvTranspose:
  """torch `ConvTranspose2d(padding=0)` with kernel_size == stride (SAM's upscaling layers), as `ConvTranspose`."""
  if tuple(kernel_size) != tuple(strides) or kernel_size[0] != kernel_size[1]:
    raise NotImplementedError(f"only square kernels equal to the stride, got kernel {kernel_size}, "
                              f"strides {strides}")
  return ConvTranspose(features, kernel_size[0], in_axis=in_axis, out_axis=out_axis, dtype=dtype,
                       param_dtype=param_dtype, name=name)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch's `nn.GELU()` default, computed in float32 whatever x's dtype.

  Written out rather than `nn.gelu(x, approximate=False)`: for bf16 inputs XLA's GPU compiler split that
  one into two passes over the MLP's hidden activations; this form is one. SAM-H encoder, H100, batch 8,
  bf16: 128.6 -> 113.4 ms, as fast as the tanh approximation (114.4 ms), measured in one run.
  """
  y = x.astype(jnp.float32)
  return (0.5 * y * (1.0 + jax.lax.erf(y * 0.7071067811865476))).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: Optional[jax.Array] = None,
              mask: Optional[jax.Array] = None, scale: Optional[float] = None,
              implementation: Optional[str] = None) -> jax.Array:
  """Multi-head attention on (B, T, N, H) tensors, through `jax.nn.dot_product_attention`.

  `bias` and `mask` broadcast to (B, N, T, S). `implementation` is None (XLA, or the best available),
  "xla" or "cudnn" (flash attention on NVIDIA GPUs; needs fp16/bf16 inputs).
  Softmax runs in float32 whatever the input dtype.
  """
  if implementation == "cudnn" and mask is not None:
    # cuDNN takes the mask as a bias with full query and key lengths (a (B, 1, 1, S) key mask is refused),
    # and all heads: jax's batching rule for the cuDNN call (the evaluator vmaps BEiT-3 over images)
    # reshapes the bias to (B, N, T, S) and fails on a broadcast head axis.
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)


# Key and query blocks of `heads_first_attention` on the CPU (measured there: 512 x 512 ran Hiera-L's global
# attention and SAM-2's memory cross-attention fastest of 256-2048).
ATTENTION_BLOCK = 512


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          key_mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention on heads-first (B, N, T, D) tensors -> (B, N, Tq, D), scaled by D^-0.5; `key_mask`
  (B, S), True = attend, broadcasts over heads and queries.

  The maths of `jax.nn.dot_product_attention`'s XLA path (logits and softmax in float32, masked logits at the
  float32 minimum, so a row with no key left averages them all), arranged for XLA:CPU, which neither fuses
  attention nor streams it:
  - heads ahead of the tokens, so both products are plain batched matmuls (the (B, T, N, D) form's products ran
    several times slower);
  - the softmax normalised after the value product, on (Tq, D) instead of (Tq, S): one pass over the logits
    fewer (Hiera-L's windowed attention 2x faster);
  - on the CPU, keys longer than two blocks are streamed in `ATTENTION_BLOCK` blocks with a running maximum
    and sum (flash attention's online softmax), queries in blocks too, so the logits stay in cache instead of
    being materialised (Hiera-L's global attention ~1.6x, SAM-2's memory attention ~1.3x faster). Other
    platforms compile the single pass.
  """
  single = functools.partial(_attention_single_pass, key_mask=key_mask)
  if k.shape[2] <= 2 * ATTENTION_BLOCK:
    return single(q, k, v)
  blocked = functools.partial(_attention_blocked, key_mask=key_mask, block=ATTENTION_BLOCK)
  return jax.lax.platform_dependent(q, k, v, cpu=blocked, default=single)


def _masked_logits(q: jax.Array, k: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """(B, N, Tq, D), (B, N, S, D), (B, S) or None -> float32 logits (B, N, Tq, S), scaled and masked."""
  logits = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(q.shape[-1] ** -0.5)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return logits


def softmax_value(logits: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(logits) @ v over the last axis: float32 logits (B, N, T, S), v (B, N, S, D) -> (B, N, T, D) in v's
  dtype. The normalisation is applied to the (T, D) product instead of the (T, S) probabilities: one pass over
  the logits fewer (SAM ViT-B's global attention on 2 cores 0.94 s -> 0.73 s, Hiera-L's windowed one 2x)."""
  probs = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum("bnqk,bnkd->bnqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / probs.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _attention_single_pass(q, k, v, *, key_mask):
  return softmax_value(_masked_logits(q, k, key_mask), v)


def _attention_blocked(q, k, v, *, key_mask, block: int):
  b, n, t, d = q.shape
  s = k.shape[2]
  q_block = min(block, t)
  pad_t, pad_s = -t % q_block, -s % block
  if pad_s:  # padded keys get no weight, even in a row whose real keys are all masked
    if key_mask is not None:
      key_mask = jnp.pad(key_mask, ((0, 0), (0, pad_s)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_s), (0, 0))) for x in (k, v))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, pad_t), (0, 0)))

  def blocks(x, axis, size=block):  # split `axis` into blocks, stacked in front
    x = x.reshape(*x.shape[:axis], -1, size, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  real_key = blocks(jnp.arange(s + pad_s) < s, 0) if pad_s else None
  key_blocks = (blocks(k, 2), blocks(v, 2), None if key_mask is None else blocks(key_mask, 1), real_key)

  def one_query_block(q_blk):
    def step(carry, kv):
      top, total, acc = carry
      k_blk, v_blk, mask_blk, real_blk = kv
      logits = _masked_logits(q_blk, k_blk, mask_blk)
      if real_blk is not None:
        logits = jnp.where(real_blk, logits, -jnp.inf)
      new_top = jnp.maximum(top, jax.lax.stop_gradient(logits.max(axis=-1)))
      probs = jnp.exp(logits - new_top[..., None])
      decay = jnp.exp(top - new_top)
      acc = acc * decay[..., None] + jnp.einsum("bnqk,bnkd->bnqd", probs.astype(v.dtype), v_blk,
                                                preferred_element_type=jnp.float32)
      return (new_top, total * decay + probs.sum(axis=-1), acc), None

    shape = q_blk.shape[:3]
    init = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, d), jnp.float32))
    (_, total, acc), _ = jax.lax.scan(step, init, key_blocks)
    return acc / total[..., None]

  out = jax.lax.map(one_query_block, blocks(q, 2, q_block))  # (T / q_block, B, N, q_block, D)
  out = jnp.moveaxis(out, 0, 2).reshape(b, n, t + pad_t, d)[:, :, :t]
  return out.astype(v.dtype)


def mesh_axes(name: Optional[str]) -> tuple[str, ...]:
  """The axes of the active mesh that the active rules (`evf_jax.sharding.activate`) split the logical axis `name`
  over; () without a mesh or rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if name is None or mesh.empty:
    return ()
  spec = nn.logical_to_mesh_axes((name,))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return tuple(a for a in axes if a in mesh.shape)


def batch_shards() -> int:
  """How many ways the logical "batch" axis is split under the active mesh and rules (`evf_jax.sharding.activate`):
  the product of the sizes of the mesh axes its rule names; 1 without a mesh or rules."""
  sizes = jax.sharding.get_abstract_mesh().shape
  return math.prod(sizes[a] for a in mesh_axes("batch"))


def batch_vmap(fn: Callable) -> Callable:
  """`jax.vmap(fn)` over a leading axis that is the logical "batch" (e.g. images, each with its own prompts).
  Under an active mesh and rules the mapped axis is split over the batch's mesh axes, and inside `fn` the
  "batch" rule is off, so `batch_constraint` there pins the per-example axes whole instead of splitting them a
  second time (which would move every example's rows between devices). Plain `jax.vmap` otherwise."""

  def mapped(*args):
    axes = mesh_axes("batch")
    if not axes:
      return jax.vmap(fn)(*args)
    inner = tuple((name, None if name == "batch" else target) for name, target in nn.get_logical_axis_rules())
    with nn.logical_axis_rules(inner):  # vmap traces `fn` now, under these rules
      return jax.vmap(fn, spmd_axis_name=axes)(*args)

  return mapped


def batch_constraint(x: jax.Array) -> jax.Array:
  """Pins the first axis of an activation to the logical "batch" axis and the rest to replicated, so that under
  a mesh with FSDP the weights are gathered to the data (not the data to the weights). A no-op without an
  active mesh and rules (`evf_jax.sharding.activate`)."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
