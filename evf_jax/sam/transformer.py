"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Mirrors `segment_anything/modeling/transformer.py`. LayerNorms use torch's default epsilon (1e-5) and
the MLP uses ReLU, as the reference builds it.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers
from evf_jax.sam.common import MLPBlock

Dtype = Any
LN_EPS = 1e-5


class Attention(nn.Module):
  """Multi-head attention whose q/k/v are projected down to `dim // downsample_rate`."""
  dim: int
  num_heads: int
  downsample_rate: int = 1
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.dim // self.downsample_rate
    if inner % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} must divide the internal width {inner}")
    split = lambda x: x.reshape(*x.shape[:2], self.num_heads, inner // self.num_heads)  # noqa: E731
    q = split(layers.dense(inner, ("embed", "heads"), name="q_proj", **kw)(q))
    k = split(layers.dense(inner, ("embed", "heads"), name="k_proj", **kw)(k))
    v = split(layers.dense(inner, ("embed", "heads"), name="v_proj", **kw)(v))
    out = layers.attention(q, k, v, implementation=self.attention)
    out = out.reshape(*out.shape[:2], inner)
    return layers.dense(self.dim, ("heads", "embed"), name="out_proj", **kw)(out)


class TwoWayAttentionBlock(nn.Module):
  """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""
  dim: int
  num_heads: int
  mlp_dim: int = 2048
  downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name, rate: Attention(self.dim, self.num_heads, rate,  # noqa: E731
                                        attention=self.attention, name=name, **kw)
    norm = lambda name: layers.layer_norm(LN_EPS, name=name, **kw)  # noqa: E731
    if self.skip_first_layer_pe:
      # The first layer replaces the queries (no residual), exactly as the reference.
      queries = attn("self_attn", 1)(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + attn("self_attn", 1)(q, q, queries)
    queries = norm("norm1")(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = norm("norm2")(queries + attn("cross_attn_token_to_image", self.downsample_rate)(q, k, keys))

    queries = norm("norm3")(queries + MLPBlock(self.dim, self.mlp_dim, "relu", name="mlp", **kw)(queries))

    q, k = queries + query_pe, keys + key_pe
    keys = norm("norm4")(keys + attn("cross_attn_image_to_token", self.downsample_rate)(k, q, queries))
    return queries, keys


class TwoWayTransformer(nn.Module):
  depth: int = 2
  dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  downsample_rate: int = 2
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
               point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
    """image_embedding, image_pe: (B, h, w, C); point_embedding: (B, N, C).
    Returns the processed tokens (B, N, C) and image tokens (B, h*w, C)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
    queries = point_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(self.dim, self.num_heads, self.mlp_dim, self.downsample_rate,
                                           skip_first_layer_pe=(i == 0), name=f"layers_{i}", **kw)(
                                               queries, keys, point_embedding, key_pe)
    q, k = queries + point_embedding, keys + key_pe
    queries = queries + Attention(self.dim, self.num_heads, self.downsample_rate,
                                  name="final_attn_token_to_image", **kw)(q, k, keys)
    queries = layers.layer_norm(LN_EPS, name="norm_final_attn", dtype=self.dtype,
                                param_dtype=self.param_dtype)(queries)
    return queries, keys
