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


def batch_constraint(x: jax.Array) -> jax.Array:
  """Pins the first axis of an activation to the logical "batch" axis and the rest to replicated, so that under
  a mesh with FSDP the weights are gathered to the data (not the data to the weights). A no-op without an
  active mesh and rules (`evf_jax.sharding.activate`)."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
