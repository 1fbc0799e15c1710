"""EVF-SAM2 (the image model; videos: `evf_jax.video`): EVF-SAM's early-fusion prompt on SAM-2. BEiT-3 fuses the image and the text; its vision
[CLS] output, projected to SAM-2's width, is the one sparse prompt of SAM-2's mask decoder (no padding point;
dense = `no_mask_embed`). The decoder runs with multimask output and the best of masks 1-3 by predicted IoU is
kept; the object-score logit is not used. The low-res logits are resized straight to the original image size.

Parameter tree: `sam/...` (`Sam2`), `beit3/...`, `projector/{fc1,fc2}`, as `EvfSam`'s. Everything about BEiT-3
and the projector is `EvfSam`'s (`text_prompts` is inherited).

Config naming trap: the released config.json says `model_type: "evf"` for both families, and its
`sam_scale: "large"` means SAM-2 Hiera-L here but SAM ViT-L in `evf_jax.evf`. Our stored config uses
`model_type: "evf_sam2"`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import config_dicts, postprocess, runtime
from evf_jax.beit3.config import Beit3Config
from evf_jax.beit3.model import Beit3
from evf_jax.evf import BEIT3_SCALES, REPEATED, EvfSam, Projector
from evf_jax.sam2 import sam2_base
from evf_jax.sam2.config import Sam2Config

Dtype = Any

MODEL_TYPE = "evf_sam2"

# The reference's `sam_scale` names <-> our SAM-2 presets. EvfSam2Model accepts "large" and "tiny" (Hiera-T);
# "toy" is ours, for tests.
SAM2_SCALES = {"large": "hiera_l", "tiny": "hiera_t", "toy": "toy"}


@dataclasses.dataclass(frozen=True)
class EvfSam2Config:
  sam2: Sam2Config
  beit3: Beit3Config
  sam_scale: str = "large"
  mm_extractor_scale: str = "large"
  # Which mask is kept, in training and inference alike: the best of masks 1-3 by predicted IoU (the original's
  # training forward and inference since its commit 9d00853). False: mask 0 of the single-mask output in train
  # mode (its training forward before that commit), for a decoder trained from scratch, whose IoU head gets no
  # gradient and so cannot pick among masks 1-3.
  multimask_output: bool = True

  def __post_init__(self):
    for field, known in (("sam_scale", SAM2_SCALES), ("mm_extractor_scale", BEIT3_SCALES)):
      if getattr(self, field) not in known:
        raise ValueError(f"unknown EVF-SAM2 {field} {getattr(self, field)!r}; expected one of {sorted(known)}")

  @property
  def hidden_size(self) -> int:
    """BEiT-3's width, the projector's input."""
    return self.beit3.embed_dim

  @property
  def out_dim(self) -> int:
    """SAM-2's prompt width, the projector's output."""
    return self.sam2.d_model

  @classmethod
  def from_scales(cls, sam_scale: str, mm_extractor_scale: str) -> EvfSam2Config:
    """From the reference's config.json names (unknown names fail in `__post_init__`)."""
    sam2 = Sam2Config.preset(SAM2_SCALES[sam_scale]) if sam_scale in SAM2_SCALES else None
    beit3 = Beit3Config.preset(mm_extractor_scale) if mm_extractor_scale in BEIT3_SCALES else None
    return cls(sam2=sam2, beit3=beit3, sam_scale=sam_scale, mm_extractor_scale=mm_extractor_scale)

  @classmethod
  def preset(cls, name: str) -> EvfSam2Config:
    """evf-sam2 / evf-sam2-multitask (Hiera-L + BEiT-3-L), toy (tests)."""
    scales = {"evf-sam2": ("large", "large"), "evf-sam2-multitask": ("large", "large"), "toy": ("toy", "tiny")}
    if name not in scales:
      raise ValueError(f"unknown EVF-SAM2 preset {name!r}; expected one of {sorted(scales)}")
    return cls.from_scales(*scales[name])

  def to_dict(self) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, "sam_scale": self.sam_scale, "mm_extractor_scale": self.mm_extractor_scale,
            "hidden_size": self.hidden_size, "out_dim": self.out_dim, "multimask_output": self.multimask_output,
            "sam2": self.sam2.to_dict(), "beit3": self.beit3.to_dict()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> EvfSam2Config:
    if d.get("model_type") != MODEL_TYPE:
      raise ValueError(f"model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    multimask = d.get("multimask_output", True)  # absent from configs written before it existed
    if not isinstance(multimask, bool):  # bool("false") is True
      raise ValueError(f"multimask_output: expected a bool, got {multimask!r}")
    config = cls(sam2=Sam2Config.from_dict(d["sam2"]), beit3=Beit3Config.from_dict(d["beit3"]),
                 sam_scale=d["sam_scale"], mm_extractor_scale=d["mm_extractor_scale"], multimask_output=multimask)
    config_dicts.refuse_unknown(cls.__name__, d, config.to_dict())
    config_dicts.check_repeated(d, config, REPEATED)
    return config


class EvfSam2(EvfSam):
  """The EVF-SAM2 image model. Use its methods through `apply(..., method=...)`:

  - `embed_image(sam_images)`: SAM-2's image features, once per image.
  - `text_prompts(beit_images, input_ids, attention_mask)`: one prompt embedding per text (`EvfSam`'s).
  - `decode(image_features, prompts)`: the kept mask's logits (the best of masks 1-3 by predicted IoU, or mask 0
    with `config.multimask_output` False) and its IoU.
  - `embed_image_for_training` / `decode_for_training`: what the training step runs in their place.
  - `__call__`: all three (used by `init`).
  """
  config: EvfSam2Config

  def setup(self):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.sam = sam2_base.Sam2(self.config.sam2, attention=self.attention, **kw)
    self.beit3 = Beit3(self.config.beit3, attention=self.attention, remat=self.remat, **kw)
    self.projector = Projector(self.config.hidden_size, self.config.out_dim, **kw)

  def embed_image(self, sam_images: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(B, S, S, 3) normalised images -> (image embedding (B, h, w, C) with `no_mem_embed` added, high-res
    features ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)))."""
    return self.sam.embed_image(sam_images)

  def decode_all(self, image_features: tuple[jax.Array, tuple[jax.Array, ...]], prompts: jax.Array,
                 multimask_output: bool = True):
    """The decoder's outputs for prompts (N, C) on one image's (or N images') features: mask logits (N, M, 4h,
    4w), IoU (N, M), SAM tokens and object-score logits (N, 1); see `evf_jax.sam2.mask_decoder`."""
    embed, high_res = image_features
    return self.sam.decode(embed, high_res, extra_sparse=prompts[:, None, :], multimask_output=multimask_output)

  def decode(self, image_features: tuple[jax.Array, tuple[jax.Array, ...]],
             prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> low-res logits (N, 1, 4h, 4w) of the kept mask and its predicted IoU (N, 1): with
    `config.multimask_output` the mask with the highest predicted IoU among masks 1-3, otherwise mask 0 of the
    single-mask output in train mode (without SAM-2's eval-mode stability fallback)."""
    if not self.config.multimask_output:
      embed, high_res = image_features
      masks, iou, _, _ = self.sam.decode(embed, high_res, extra_sparse=prompts[:, None, :], multimask_output=False,
                                         training=True)
      return masks, iou
    masks, iou, _, _ = self.decode_all(image_features, prompts, multimask_output=True)
    best = jnp.argmax(iou, axis=-1)[:, None]
    return jnp.take_along_axis(masks, best[:, :, None, None], axis=1), jnp.take_along_axis(iou, best, axis=1)

  def embed_image_for_training(self, sam_images: jax.Array,
                               encoder_frozen: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`embed_image`, without a backward pass through a frozen encoder (trunk and neck); the decoder's
    high-res projections and `no_mem_embed` still get gradients when they are trained."""
    return self.sam.embed_image(sam_images, stop_encoder_gradient=encoder_frozen)

  def decode_for_training(self, image_features: tuple[jax.Array, tuple[jax.Array, ...]],
                          prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mask the loss sees: the one `decode` keeps, as the original's training `forward` (multimask output in
    train mode, the best by predicted IoU). Only the kept mask gets a gradient; the choice (an argmax) has none."""
    return self.decode(image_features, prompts)

  def __call__(self, sam_images, beit_images, input_ids, attention_mask):
    prompts = self.text_prompts(beit_images, input_ids, attention_mask)
    return self.decode(self.embed_image(sam_images), prompts)


def postprocess_matrices(original_hw: tuple[int, int], low_res: int = 256,
                         pad_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(A_y (H, low), A_x (W, low)) float32 with `postprocess.apply_matrices(logits, A_y, A_x)` equal to the
  original's `F.interpolate(low_res_logits, (H, W), mode="bilinear", align_corners=False)` (no crop: SAM-2's
  input is the whole image squashed to a square). pad_to: optional (H_pad, W_pad) >= (H, W); the extra rows are
  zero, as in `postprocess.mask_postprocess_matrices`."""
  mats = [postprocess.bilinear_matrix(low_res, n).astype(np.float32) for n in original_hw]
  if pad_to is not None:
    mats = [np.pad(m, ((0, p - m.shape[0]), (0, 0))) for m, p in zip(mats, pad_to)]
  return mats[0], mats[1]


def dummy_inputs(config: EvfSam2Config, batch: int = 1, text_len: int = 4) -> tuple[jax.Array, ...]:
  s, b = config.sam2.image_size, config.beit3.img_size
  return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, b, b, 3), jnp.float32),
          jnp.zeros((batch, text_len), jnp.int32), jnp.ones((batch, text_len), bool))


def _init_fn(config: EvfSam2Config, param_dtype: Dtype):
  """rng -> boxed params: BEiT-3 + projector from `text_prompts`, the `sam` subtree from `Sam2`'s own init (its
  mask prompt reaches `mask_downscaling`, which EVF-SAM2 never uses but its checkpoints hold)."""
  model = EvfSam2(config, param_dtype=param_dtype)
  sam = sam2_base.Sam2(config.sam2, param_dtype=param_dtype)
  text_inputs, sam_inputs = dummy_inputs(config)[1:], sam2_base.dummy_inputs(config.sam2)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    params = dict(model.init(r1, *text_inputs, method=EvfSam2.text_prompts)["params"])
    return {**params, "sam": sam.init(r2, **sam_inputs)["params"]}
  return init


def abstract_params(config: EvfSam2Config, *, param_dtype: Dtype = jnp.float32, boxed: bool = False) -> Any:
  """The parameter tree as ShapeDtypeStructs (no memory). `boxed` keeps the logical-axis metadata."""
  tree = jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))
  return tree if boxed else nn.unbox(tree)


def init_params(config: EvfSam2Config, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> Any:
  """Randomly initialised (unboxed) params, e.g. for training from scratch or tests."""
  return nn.unbox(runtime.jit_init(_init_fn(config, param_dtype))(rng))
