"""EVF-SAM: BEiT-3 fuses the image and the text early; its vision [CLS] output, projected to SAM's
prompt width, is the one sparse prompt of SAM's mask decoder.

Parameter tree: `sam/...` (SAM), `beit3/...` (BEiT-3), `projector/{fc1,fc2}` (the reference's
`text_hidden_fcs.0.{0,2}`: Linear(D, D) -> ReLU -> Linear(D, 256)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evf_jax import config_dicts, layers, runtime
from evf_jax.beit3.config import Beit3Config
from evf_jax.beit3.model import Beit3
from evf_jax.sam import sam as sam_lib
from evf_jax.sam.config import SamConfig

Dtype = Any

MODEL_TYPE = "evf"

# The reference's `sam_scale` names (its config.json) <-> our SAM presets. The original code accepts
# only "huge"; "base" / "large" / "tiny" are ours.
SAM_SCALES = {"huge": "vit_h", "large": "vit_l", "base": "vit_b", "tiny": "tiny"}
BEIT3_SCALES = ("large", "base", "tiny")
# What to_dict() repeats from the parts for readers of the JSON: from_dict checks them, it does not read them.
REPEATED = ("hidden_size", "out_dim")


@dataclasses.dataclass(frozen=True)
class EvfConfig:
  sam: SamConfig
  beit3: Beit3Config
  sam_scale: str = "huge"
  mm_extractor_scale: str = "large"

  def __post_init__(self):
    if self.sam_scale not in SAM_SCALES:
      raise ValueError(f"unknown sam_scale {self.sam_scale!r}; expected one of {sorted(SAM_SCALES)}")
    if self.mm_extractor_scale not in BEIT3_SCALES:
      raise ValueError(f"unknown mm_extractor_scale {self.mm_extractor_scale!r}; "
                       f"expected one of {list(BEIT3_SCALES)}")

  @property
  def hidden_size(self) -> int:
    return self.beit3.embed_dim

  @property
  def out_dim(self) -> int:
    return self.sam.prompt_embed_dim

  @classmethod
  def from_scales(cls, sam_scale: str, mm_extractor_scale: str) -> "EvfConfig":
    if sam_scale not in SAM_SCALES:
      raise ValueError(f"unknown sam_scale {sam_scale!r}; expected one of {sorted(SAM_SCALES)}")
    return cls(sam=SamConfig.preset(SAM_SCALES[sam_scale]), beit3=Beit3Config.preset(mm_extractor_scale),
               sam_scale=sam_scale, mm_extractor_scale=mm_extractor_scale)

  @classmethod
  def preset(cls, name: str) -> "EvfConfig":
    """evf-sam / evf-sam-multitask (SAM-H + BEiT-3-L), base (SAM-B + BEiT-3-B), tiny (tests)."""
    scales = {"evf-sam": ("huge", "large"), "evf-sam-multitask": ("huge", "large"),
              "base": ("base", "base"), "tiny": ("tiny", "tiny")}
    if name not in scales:
      raise ValueError(f"unknown EVF-SAM preset {name!r}; expected one of {sorted(scales)}")
    return cls.from_scales(*scales[name])

  def to_dict(self) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, "sam_scale": self.sam_scale,
            "mm_extractor_scale": self.mm_extractor_scale, "hidden_size": self.hidden_size,
            "out_dim": self.out_dim, "sam": self.sam.to_dict(), "beit3": self.beit3.to_dict()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "EvfConfig":
    if d.get("model_type") != MODEL_TYPE:
      raise ValueError(f"model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    config = cls(sam=SamConfig.from_dict(d["sam"]), beit3=Beit3Config.from_dict(d["beit3"]),
                 sam_scale=d["sam_scale"], mm_extractor_scale=d["mm_extractor_scale"])
    config_dicts.refuse_unknown(cls.__name__, d, config.to_dict())
    config_dicts.check_repeated(d, config, REPEATED)
    return config


class Projector(nn.Module):
  """Linear(D, D) -> ReLU -> Linear(D, out): BEiT-3's CLS feature -> one SAM prompt embedding."""
  hidden: int
  out: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    x = nn.relu(x)
    return layers.dense(self.out, ("mlp", None), name="fc2", **kw)(x)


class EvfSam(nn.Module):
  """The EVF-SAM model. Use its methods through `apply(..., method=...)`:

  - `embed_image(sam_images)`: SAM's image embedding, once per image.
  - `text_prompts(beit_images, input_ids, attention_mask)`: one prompt embedding per text.
  - `decode(image_embeddings, prompts)`: low-res mask logits and IoU scores, single-mask output.
  - `embed_image_for_training` / `decode_for_training`: what the training step runs in their place.
  - `__call__`: all three (used by `init`).
  """
  config: EvfConfig
  attention: str = "xla"
  remat: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
              remat=self.remat)
    self.sam = sam_lib.Sam(self.config.sam, **kw)
    self.beit3 = Beit3(self.config.beit3, **kw)
    self.projector = Projector(self.config.hidden_size, self.config.out_dim, dtype=self.dtype,
                               param_dtype=self.param_dtype)

  def embed_image(self, sam_images: jax.Array) -> jax.Array:
    """(B, 1024, 1024, 3) normalised, padded -> (B, 64, 64, 256)."""
    return self.sam.embed_image(sam_images)

  def text_prompts(self, beit_images: jax.Array, input_ids: jax.Array,
                   attention_mask: jax.Array) -> jax.Array:
    """BEiT-3 on (image, text) pairs -> (N, out_dim) prompt embeddings.

    beit_images: (N, 224, 224, 3) normalised to [-1, 1], or (N / r, ...): each image shared by r consecutive
      texts ((1, ...): by all N), its patches embedded once;
    input_ids / attention_mask: (N, L), right-padded, mask True at real tokens.
    """
    out = self.beit3(beit_images, input_ids, text_padding_mask=~attention_mask)
    return self.projector(out[:, 0])

  def decode(self, image_embeddings: jax.Array, prompts: jax.Array,
             multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """image_embeddings (1 or N, h, w, C), prompts (N, C) -> logits (N, M, 256, 256), iou (N, M)."""
    return self.sam.decode(image_embeddings, extra_sparse=prompts[:, None, :],
                           multimask_output=multimask_output)

  def embed_image_for_training(self, sam_images: jax.Array, encoder_frozen: bool) -> jax.Array:
    """`embed_image`, without a backward pass through a frozen encoder."""
    embeddings = self.embed_image(sam_images)
    return jax.lax.stop_gradient(embeddings) if encoder_frozen else embeddings

  def decode_for_training(self, image_embeddings: jax.Array, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mask the loss sees: single-mask output, as the original's training forward."""
    return self.decode(image_embeddings, prompts)

  def __call__(self, sam_images, beit_images, input_ids, attention_mask):
    prompts = self.text_prompts(beit_images, input_ids, attention_mask)
    return self.decode(self.embed_image(sam_images), prompts)


def dummy_inputs(config: EvfConfig, batch: int = 1, text_len: int = 4) -> tuple[jax.Array, ...]:
  s, b = config.sam.img_size, config.beit3.img_size
  return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, b, b, 3), jnp.float32),
          jnp.zeros((batch, text_len), jnp.int32), jnp.ones((batch, text_len), bool))


def _init_fn(config: EvfConfig, param_dtype: Dtype):
  """rng -> boxed params of the full tree.

  SAM's `mask_downscaling` convs are reached only with a mask prompt, which EVF-SAM never passes;
  the SAM subtree comes from `Sam`'s own init (with a mask prompt) so the tree matches the checkpoints.
  The EvfSam init runs `text_prompts` only (BEiT-3 + projector): tracing SAM twice cost ~1/3 of
  `abstract_params`, which every checkpoint load runs.
  """
  model = EvfSam(config, param_dtype=param_dtype)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    params = dict(model.init(r1, *dummy_inputs(config)[1:], method=EvfSam.text_prompts)["params"])
    params["sam"] = sam_lib.Sam(config.sam, param_dtype=param_dtype).init(
        r2, **sam_lib.dummy_inputs(config.sam))["params"]
    return params
  return init


def abstract_params(config: EvfConfig, *, param_dtype: Dtype = jnp.float32, boxed: bool = False) -> Any:
  """The parameter tree as ShapeDtypeStructs (no memory). `boxed` keeps the logical-axis metadata."""
  tree = jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))
  return tree if boxed else nn.unbox(tree)


def init_params(config: EvfConfig, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> Any:
  """Randomly initialised (unboxed) params, e.g. for training from scratch or tests."""
  return nn.unbox(runtime.jit_init(_init_fn(config, param_dtype))(rng))


def cast_kernels(params: Any, dtype: Dtype) -> Any:
  """The tree with every Dense/Conv "kernel" stored in `dtype` (the compute dtype of bf16/fp16 inference).

  The modules cast kernels to their compute dtype on every use anyway, so results are bit-identical
  (checked by tests), while the weights take half the memory and no per-call cast passes. Other leaves
  (biases, LayerNorms, positional tables, the prompt encoder's Fourier matrix) stay as stored: some are
  used in float32 before any cast.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, params)

