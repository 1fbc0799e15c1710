"""BEiT-3 (torchscale's multiway transformer encoder) in Flax linen, as EVF-SAM uses it.

Mirrors torchscale 0.3.0: `model/BEiT3.py`, `architecture/encoder.py`, `component/{multiway_network,
multihead_attention,feedforward_network,embedding}.py`. Parameter paths keep torchscale's names
(`encoder/layers_3/self_attn/q_proj/A/kernel` for `encoder.layers.3.self_attn.q_proj.A.weight`), so
conversion is a near-identity rule table (convert/beit3.py).

Multiway: every LayerNorm, attention projection and FFN has two experts, `A` for vision tokens and
`B` for text tokens. torchscale switches them with a mutable `split_position` (-1: all A, 0: all B,
else the first `split` tokens go to A); here the split is a static module field, fixed by which
inputs are given, so shapes stay static under jit.

Layout differences from torch: images are NHWC `(B, H, W, 3)`; everything else is the same.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from evf_jax import layers, runtime
from evf_jax.beit3.config import Beit3Config

Dtype = Any

# torchscale's MultiwayNetwork split positions: all tokens through A / all through B.
ALL_A = -1
ALL_B = 0


def _num_a(split: int, t: int) -> int:
  """How many of `t` tokens go to expert A for a torchscale split position."""
  return {ALL_A: t, ALL_B: 0}.get(split, split)


def _split_apply(parent: nn.Module, x: jax.Array, split: int, a, b) -> jax.Array:
  """Applies expert `a` to tokens [:n_a] and `b` to the rest (axis 1), as MultiwayNetwork.

  While initialising, an expert with no tokens still runs on an empty slice, so the parameter tree
  always holds both experts whatever inputs `init` was given.
  """
  n_a = _num_a(split, x.shape[1])
  init = parent.is_initializing()
  parts = []
  if n_a > 0 or init:
    parts.append(a(x[:, :n_a]))
  if n_a < x.shape[1] or init:
    parts.append(b(x[:, n_a:]))
  parts = [y for y in parts if y.shape[1]] or parts[:1]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class MultiwayDense(nn.Module):
  """`MultiwayWrapper(nn.Linear)`: torch Linear experts `A`, `B`."""
  features: int
  axes: tuple[Optional[str], Optional[str]]
  split: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return _split_apply(self, x, self.split, layers.dense(self.features, self.axes, name="A", **kw),
                        layers.dense(self.features, self.axes, name="B", **kw))


class MultiwayLayerNorm(nn.Module):
  """`MultiwayWrapper(LayerNorm)`."""
  epsilon: float
  split: int
  axis_name: Optional[str] = "embed"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    return _split_apply(self, x, self.split, layers.layer_norm(self.epsilon, name="A", **kw),
                        layers.layer_norm(self.epsilon, name="B", **kw))


class FeedForward(nn.Module):
  """torchscale FeedForwardNetwork with subln: fc1 -> GELU (fp32) -> ffn_layernorm -> fc2."""
  embed_dim: int
  ffn_dim: int
  epsilon: float
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.ffn_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    h = layers.gelu(h.astype(jnp.float32)).astype(h.dtype)  # torch: activation_fn(x.float()).type_as(x)
    h = layers.layer_norm(self.epsilon, name="ffn_layernorm", axis_name="mlp", **kw)(h)
    return layers.dense(self.embed_dim, ("mlp", "embed"), name="fc2", **kw)(h)


class MultiwayFeedForward(nn.Module):
  """`MultiwayWrapper(FeedForwardNetwork)`: experts `A`, `B`, each with fc1/fc2/ffn_layernorm."""
  embed_dim: int
  ffn_dim: int
  epsilon: float
  split: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return _split_apply(self, x, self.split,
                        FeedForward(self.embed_dim, self.ffn_dim, self.epsilon, name="A", **kw),
                        FeedForward(self.embed_dim, self.ffn_dim, self.epsilon, name="B", **kw))


class SelfAttention(nn.Module):
  """torchscale MultiheadAttention (self-attention, subln, multiway; no rel-pos, no xpos)."""
  config: Beit3Config
  split: int
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask: Optional[jax.Array]):
    cfg = self.config
    kw = dict(split=self.split, dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, d = x.shape
    q = MultiwayDense(d, ("embed", "heads"), name="q_proj", **kw)(x)
    k = MultiwayDense(d, ("embed", "heads"), name="k_proj", **kw)(x)
    v = MultiwayDense(d, ("embed", "heads"), name="v_proj", **kw)(x)
    # torchscale scales q (in the compute dtype) before QK^T; do the same and give the kernel scale 1.
    q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
    heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    o = layers.attention(heads(q), heads(k), heads(v), mask=key_mask, scale=1.0,
                         implementation=self.attention)
    o = o.reshape(b, t, d)
    o = MultiwayLayerNorm(cfg.layernorm_eps, axis_name="heads", name="inner_attn_ln", **kw)(o)
    return MultiwayDense(d, ("heads", "embed"), name="out_proj", **kw)(o)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN(x)); x + ffn(LN(x)). Residual alpha is 1 (no deepnorm)."""
  config: Beit3Config
  split: int
  attention: str = "xla"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask: Optional[jax.Array]):
    cfg = self.config
    kw = dict(split=self.split, dtype=self.dtype, param_dtype=self.param_dtype)
    h = MultiwayLayerNorm(cfg.layernorm_eps, name="self_attn_layer_norm", **kw)(x)
    h = SelfAttention(cfg, attention=self.attention, name="self_attn", **kw)(h, key_mask)
    x = x + h
    h = MultiwayLayerNorm(cfg.layernorm_eps, name="final_layer_norm", **kw)(x)
    h = MultiwayFeedForward(cfg.embed_dim, cfg.ffn_dim, cfg.layernorm_eps, name="ffn", **kw)(h)
    return x + h


class VisionEmbedding(nn.Module):
  """Patch conv + prepended CLS token. `mask_token` exists (for conversion/pretraining) but is unused."""
  config: Beit3Config
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    cfg = self.config
    if image.shape[1:] != (cfg.img_size, cfg.img_size, cfg.in_chans):
      raise ValueError(f"BEiT-3 expects NHWC images of shape (B, {cfg.img_size}, {cfg.img_size}, "
                       f"{cfg.in_chans}), got {image.shape}")
    p = cfg.patch_size
    x = layers.PatchConv(cfg.embed_dim, p, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(image)
    x = x.reshape(x.shape[0], cfg.num_patches, cfg.embed_dim)  # row-major over (h, w), as torch's flatten(2)
    token_init = layers.logical(nn.initializers.truncated_normal(0.02), (None, None, "embed"))
    cls = self.param("cls_token", token_init, (1, 1, cfg.embed_dim), self.param_dtype)
    self.param("mask_token", token_init, (1, 1, cfg.embed_dim), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.embed_dim))
    return jnp.concatenate([cls, x], axis=1)


class Embed(nn.Module):
  """A plain lookup table (torch nn.Embedding) with logical names; the table is stored as `embedding`."""
  num: int
  features: int
  axes: tuple[Optional[str], Optional[str]]
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    table = self.param("embedding", layers.logical(nn.initializers.normal(self.features ** -0.5), self.axes),
                       (self.num, self.features), self.param_dtype)
    if ids.ndim > 1:
      return _lookup_in_width_shards(table, ids, self.axes, self.dtype)
    # Position ids, no batch: the table is small, gathered before the lookup as any FSDP weight.
    out = jnp.take(nn.with_logical_constraint(table, (self.axes[0], None)), ids, axis=0)
    return out.astype(self.dtype) if self.dtype is not None else out


def _lookup_in_width_shards(table: jax.Array, ids: jax.Array, axes, dtype) -> jax.Array:
  """`table[ids]` where FSDP splits the table along its width. Each device looks up its slice of the width for
  the ids of every device that shares its `data` index, so the table's gradient is summed over `data` only, one
  width slice of it: for BEiT-3-large's text table over fsdp=16, 16 MB instead of the whole table's 262 MB in
  float32. Gathering the table first costs the table and its whole gradient in every step; left to itself, XLA
  gathered every device's token rows at full width."""
  sizes = jax.sharding.get_abstract_mesh().shape
  batch = layers.mesh_axes("batch")
  # No batch rule (no mesh, or inside `layers.batch_vmap`, where the mapped axis carries it): a plain lookup.
  width = tuple(a for a in layers.mesh_axes(axes[1]) if sizes[a] > 1) if batch else ()
  rows = tuple(a for a in batch if a not in width)
  rest = (None,) * (ids.ndim - 1)
  if width:
    ids = jax.lax.with_sharding_constraint(ids, P(rows or None, *rest))
  out = jnp.take(table, ids, axis=0)
  out = out.astype(dtype) if dtype is not None else out
  if width:  # the next batch constraint moves the rows to the batch layout (an all-to-all)
    out = jax.lax.with_sharding_constraint(out, P(rows or None, *rest, width))
  return out


class EmbedPositions(nn.Module):
  """`MutliwayEmbedding` of two learned position tables, fairseq offset 2 (positions restart per stream).

  A (vision) has `vision_len + 2` rows, B (text) `max_source_positions` rows. Stream A uses rows
  2..n_a+1 of A, stream B rows 2..n_b+1 of B.
  """
  config: Beit3Config
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, n_a: int, n_b: int) -> jax.Array:
    cfg = self.config
    if n_a > cfg.vision_positions - 2 or n_b > cfg.max_text_len:
      raise ValueError(f"sequence too long for the position tables: {n_a} vision tokens (max "
                       f"{cfg.vision_positions - 2}), {n_b} text tokens (max {cfg.max_text_len})")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    parts = []
    init = self.is_initializing()
    if n_a or init:
      parts.append(Embed(cfg.vision_positions, cfg.embed_dim, (None, "embed"), name="A", **kw)(
          jnp.arange(2, n_a + 2)))
    if n_b or init:
      parts.append(Embed(cfg.max_source_positions, cfg.embed_dim, (None, "embed"), name="B", **kw)(
          jnp.arange(2, n_b + 2)))
    return jnp.concatenate(parts, axis=0)


class Encoder(nn.Module):
  """torchscale Encoder: multiway positions, padding zeroing, layers, final multiway LayerNorm."""
  config: Beit3Config
  split: int
  attention: str = "xla"
  remat: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array]) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n_a = _num_a(self.split, x.shape[1])
    pos = EmbedPositions(cfg, name="embed_positions", **kw)(n_a, x.shape[1] - n_a)
    x = x + pos[None].astype(x.dtype)
    key_mask = None
    if padding_mask is not None:
      # torchscale zeroes padded tokens after the embedding sum and masks them (-inf) as keys.
      x = x * (1 - padding_mask[..., None].astype(x.dtype))
      key_mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, S): True = may attend

    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, split=self.split, attention=self.attention, name=f"layers_{i}",
                    **kw)(layers.batch_constraint(x), key_mask)
    return MultiwayLayerNorm(cfg.layernorm_eps, split=self.split, name="layer_norm", **kw)(x)


class Beit3(nn.Module):
  """BEiT-3 as torchscale's `BEiT3.forward(textual_tokens, visual_tokens, text_padding_position)`.

  Attributes:
    config: the architecture.
    attention: `implementation` for `jax.nn.dot_product_attention` (None, "xla", "cudnn").
    remat: rematerialise each encoder layer in the backward pass (saves memory when training).
    dtype: compute dtype (None: follow the inputs/params); param_dtype: parameter dtype.
  """
  config: Beit3Config
  attention: str = "xla"
  remat: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: Optional[jax.Array] = None, input_ids: Optional[jax.Array] = None,
               text_padding_mask: Optional[jax.Array] = None) -> jax.Array:
    """Encodes an image, a text, or both (vision tokens first, then text tokens).

    Args:
      image: (B, H, W, 3) float, normalised as BEiT-3 expects (NHWC; torch's NCHW transposed); with a text, also
        (B / r, H, W, 3): each image is shared by r consecutive texts and embedded once (as r copies would be).
      input_ids: (B, L) int token ids (XLM-R convention, `<pad>` = config.pad_token_id).
      text_padding_mask: (B, L) bool, True at padding (torchscale's `text_padding_position`).
        Default: `input_ids == config.pad_token_id`, which is what EVF-SAM passes.
    Returns:
      encoder_out (B, T, D) after the final multiway LayerNorm, T = [1 + patches] + [L].
      EVF-SAM's feature is `encoder_out[:, 0]` (the vision CLS token).
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if image is None and input_ids is None:
      raise ValueError("Beit3 needs an image, input_ids, or both")
    init = self.is_initializing()
    vision = VisionEmbedding(cfg, name="vision_embed", **kw)
    text = Embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"), name="text_embed", **kw)
    if init:  # create every parameter whatever the inputs
      if image is None:
        vision(jnp.zeros((0, cfg.img_size, cfg.img_size, cfg.in_chans), self.param_dtype))
      if input_ids is None:
        text(jnp.zeros((0, 1), jnp.int32))

    padding = None
    if input_ids is not None:
      if text_padding_mask is None:
        text_padding_mask = input_ids == cfg.pad_token_id
      text_padding_mask = jnp.asarray(text_padding_mask, bool)
    if input_ids is None:
      x, split = vision(image), ALL_A
    elif image is None:
      x, split, padding = text(input_ids), ALL_B, text_padding_mask
    else:
      n_image, n_text = image.shape[0], input_ids.shape[0]
      if n_text % n_image if n_image else n_text:
        raise ValueError(f"image batch {n_image} does not divide text batch {n_text}")
      xv, xt = vision(image), text(input_ids)
      if xv.shape[0] != xt.shape[0]:  # the patch embedding once per image, its tokens for each of the image's texts
        xv = jnp.repeat(xv, xt.shape[0] // xv.shape[0], axis=0)
      x, split = jnp.concatenate([xv, xt.astype(xv.dtype)], axis=1), xv.shape[1]
      padding = jnp.concatenate([jnp.zeros(xv.shape[:2], bool), text_padding_mask], axis=1)
    return Encoder(cfg, split=split, attention=self.attention, remat=self.remat,
                   name="encoder", **kw)(x, padding)


def dummy_inputs(config: Beit3Config, batch: int = 1, text_len: int = 4):
  """Inputs for `init` / `eval_shape` (any inputs give the full parameter tree)."""
  return (jnp.zeros((batch, config.img_size, config.img_size, config.in_chans), jnp.float32),
          jnp.zeros((batch, text_len), jnp.int32))


def _init_fn(config: Beit3Config, param_dtype: Dtype):
  model = Beit3(config, param_dtype=param_dtype)
  return lambda rng: model.init(rng, *dummy_inputs(config))["params"]


def abstract_params(config: Beit3Config, *, param_dtype: Dtype = jnp.float32, boxed: bool = False) -> dict:
  """The parameter tree as ShapeDtypeStructs (no memory). `boxed` keeps the logical-axis metadata."""
  tree = jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))
  return tree if boxed else nn.unbox(tree)


def init_params(config: Beit3Config, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised (unboxed) params."""
  return nn.unbox(runtime.jit_init(_init_fn(config, param_dtype))(rng))
