"""Modules segment-anything keeps in `modeling/common.py`: the MLP block shared by the image encoder and
the two-way transformer. (Its LayerNorm2d is `layers.layer_norm` on NHWC tensors: the same math.)"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import layers

Dtype = Any


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
