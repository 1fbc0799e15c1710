"""Text-prompted segmentation with the image embedding computed once, for EVF-SAM and EVF-SAM2 checkpoints.

    p = Predictor.from_checkpoint(DIR)
    p.set_image(rgb_uint8_hwc)                 # SAM embedding + BEiT-3 input, cached on device
    r = p.predict(["zebra top left", "[semantic] sky"])
    r.masks, r.logits, r.scores

All prompts of one `predict` call go through one jitted computation (BEiT-3, projector, prompt encoder
and mask decoder batched over prompts). Shapes are bucketed so repeated calls do not recompile:
the number of prompts rounds up to a power of two, the text length to a tokenizer bucket, and the
original image size to a multiple of `size_multiple` for the postprocess.

The two families differ only in the model class and the SAM-side image input (`evf_jax.families`): EVF-SAM2's
cached image features are (embedding, high-res features), and its `decode` keeps the best of masks 1-3.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import buckets, families, images, postprocess, runtime
from evf_jax.beit3.preprocess import beit_image
from evf_jax.checkpoints import load_checkpoint
from evf_jax.errors import UserError
from evf_jax.evf import cast_kernels
from evf_jax.runtime import compute_dtype, enable_compilation_cache
from evf_jax.tokenizer import check_fits_model, check_prompts


class PromptError(UserError, ValueError):
  pass


@dataclasses.dataclass
class Prediction:
  masks: np.ndarray    # (N, H, W) bool, logits > 0
  logits: np.ndarray   # (N, H, W) float32 at the original image size
  scores: np.ndarray   # (N,) predicted IoU


class Predictor:
  """EVF-SAM / EVF-SAM2 inference on one image at a time, any number of prompts per call.

  Args:
    config: the model architecture, an `EvfConfig` or an `EvfSam2Config` (it picks the family).
    params: the converted parameter tree (numpy or jax arrays).
    tokenizer: an `evf_jax.tokenizer.TextTokenizer`.
    precision: "fp32", "bf16" or "fp16" compute dtype (parameters keep their stored dtype; LayerNorm
      statistics and softmax run in float32 always).
    attention: "xla" or "cudnn" (flash attention on NVIDIA GPUs, bf16/fp16); see `evf_jax.runtime`.
    size_multiple: original image sizes are padded up to a multiple of this for the postprocess.
  """

  def __init__(self, config: families.ModelConfig, params: Any, tokenizer, *, precision: str = "fp32",
               attention: str = "xla", size_multiple: int = buckets.SIZE_MULTIPLE):
    dtype = compute_dtype(precision, attention)
    runtime.check_precision_platform(precision)
    check_fits_model(tokenizer, config.beit3)
    if not isinstance(size_multiple, int) or size_multiple < 1:
      raise UserError(f"size_multiple must be a positive int, got {size_multiple!r}")
    self.config = config
    self.family = families.family_of(config)
    self.image_input = image_input = families.image_input(config)
    self.tokenizer = tokenizer
    self.precision = precision
    self.size_multiple = size_multiple
    self.model = self.family.model_class(config, attention=attention, dtype=dtype)
    self.params = jax.device_put(cast_kernels(params, dtype))
    self._image = None  # (embedding, beit image, original hw, postprocess matrices)
    model = self.model

    # Methods by name: the family's model class overrides `embed_image` and `decode`.
    encoder_jit = runtime.jit_eigen_dots if self.family.eigen_dots_encoder else jax.jit

    @encoder_jit
    def embed(params, resized_u8, input_hw):
      x = image_input.normalize(resized_u8, input_hw)
      return model.apply({"params": params}, x.astype(model.dtype), method="embed_image")

    @jax.jit
    def decode(params, embedding, beit_image, input_ids, attention_mask):
      prompts = model.apply({"params": params}, beit_image.astype(model.dtype), input_ids,
                            attention_mask, method="text_prompts")
      low, iou = model.apply({"params": params}, embedding, prompts, method="decode")
      return low[:, 0].astype(jnp.float32), iou[:, 0].astype(jnp.float32)

    @jax.jit
    def upsample(low, a_y, a_x):
      return postprocess.apply_matrices(low, a_y, a_x)

    self._embed, self._decode, self._upsample = embed, decode, upsample

  # Construction.
  @classmethod
  def from_checkpoint(cls, directory: str, *, precision: str = "fp32", attention: str = "xla",
                      compilation_cache_dir: Optional[str] = None, max_text_len: Optional[int] = None,
                      **kwargs) -> "Predictor":
    """Loads a directory written by `run.py convert`."""
    compute_dtype(precision, attention)  # bad choices before the (slow) load
    runtime.check_precision_platform(precision)
    if compilation_cache_dir:
      enable_compilation_cache(compilation_cache_dir)
    config, params, tokenizer = load_checkpoint(directory, max_text_len=max_text_len)
    return cls(config, params, tokenizer, precision=precision, attention=attention, **kwargs)

  # Image.
  def set_image(self, image: np.ndarray) -> None:
    """Computes and caches SAM's image embedding (SAM-2's features) and BEiT-3's input for an RGB uint8
    (H, W, 3) image. If it fails, no image is set (a later `predict` never answers for the image before)."""
    self._image = None
    image = images.check_rgb_array(image)
    self.image_input.check_fits(image.shape[:2])
    framed, input_hw = self.image_input.frame(image)
    embedding = self._embed(self.params, framed[None], np.asarray([input_hw], np.int32))
    beit = beit_image(image, self.config.beit3.img_size)[None]
    orig_hw = tuple(image.shape[:2])
    a_y, a_x = self.image_input.mask_matrices(input_hw, orig_hw, self.padded_hw(orig_hw))
    self._image = dict(embedding=embedding, beit=jnp.asarray(beit), orig_hw=orig_hw,
                       a_y=jnp.asarray(a_y), a_x=jnp.asarray(a_x))

  def padded_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) an original image size is padded up to for the postprocess (its shape bucket)."""
    return (buckets.round_up(hw[0], self.size_multiple), buckets.round_up(hw[1], self.size_multiple))

  def precompile(self, image_hw: tuple[int, int] = (480, 640), num_prompts: int = 1,
                 text_length: int = 16) -> dict[str, dict[str, float]]:
    """Traces, lowers and compiles the three programs for one shape bucket without running them, and
    returns the seconds each stage took. With the persistent compilation cache on, a later process
    finds these programs there."""
    s, b = self.image_input.size, self.config.beit3.img_size
    n = buckets.pow2_at_least(num_prompts)
    pad_hw = self.padded_hw(image_hw)
    low = self.image_input.low_res
    sds = jax.ShapeDtypeStruct
    emb = jax.eval_shape(self._embed, self.params, sds((1, s, s, 3), jnp.uint8), sds((1, 2), jnp.int32))
    programs = {
        "embed": (self._embed, (self.params, sds((1, s, s, 3), jnp.uint8), sds((1, 2), jnp.int32))),
        "decode": (self._decode, (self.params, emb, sds((1, b, b, 3), jnp.float32),
                                  sds((n, text_length), jnp.int32), sds((n, text_length), jnp.bool_))),
        "upsample": (self._upsample, (sds((n, low, low), jnp.float32), sds((pad_hw[0], low), jnp.float32),
                                      sds((pad_hw[1], low), jnp.float32))),
    }
    times = {}
    for name, (fn, args) in programs.items():
      t0 = time.perf_counter()
      lowered = fn.lower(*args)
      t1 = time.perf_counter()
      lowered.compile()
      times[name] = {"trace_lower": t1 - t0, "compile": time.perf_counter() - t1}
    return times

  @property
  def image_embedding(self) -> Any:
    """The cached image embedding: an array, or EVF-SAM2's (embedding, high-res features)."""
    self._require_image()
    return self._image["embedding"]

  def _require_image(self):
    if self._image is None:
      raise UserError("no image set: call set_image(image) before predict()")

  # Prompts.
  def predict(self, prompts: Sequence[str]) -> Prediction:
    """Masks for each text prompt on the current image."""
    input_ids, attention_mask = encode_prompts(self.tokenizer, prompts)
    return self.predict_tokens(input_ids, attention_mask)

  def predict_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Prediction:
    """As `predict`, for callers that tokenise themselves: (N, L) ids, (N, L) bool (True = token)."""
    self._require_image()
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask, bool)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] == 0:
      raise PromptError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be "
                        "the same non-empty (N, L)")
    if input_ids.dtype.kind not in "iu":
      raise PromptError(f"input_ids must be integers, got {input_ids.dtype}")
    vocab, positions = self.config.beit3.vocab_size, self.config.beit3.max_text_len
    if input_ids.size and not 0 <= input_ids.min() <= input_ids.max() < vocab:  # jax's gather: NaN past the table
      raise PromptError(f"input_ids must lie in [0, {vocab}) (this model's vocabulary), got "
                        f"{input_ids.min()} to {input_ids.max()}: another tokenizer's ids?")
    if input_ids.shape[1] > positions:
      raise PromptError(f"input_ids are {input_ids.shape[1]} long, more than this model's {positions} text positions")
    input_ids = input_ids.astype(np.int32)
    n = input_ids.shape[0]
    n_pad = buckets.pow2_at_least(n)
    if n_pad != n:  # filler prompts "<s></s>", dropped below
      filler = np.full((n_pad - n, input_ids.shape[1]), self.tokenizer.pad_id, np.int32)
      filler[:, 0], filler[:, 1] = 0, 2
      fmask = np.zeros_like(filler, bool)
      fmask[:, :2] = True
      input_ids = np.concatenate([input_ids, filler])
      attention_mask = np.concatenate([attention_mask, fmask])
    img = self._image
    low, iou = self._decode(self.params, img["embedding"], img["beit"], input_ids, attention_mask)
    logits = self._upsample(low, img["a_y"], img["a_x"])  # padded shapes: no recompile per n or (H, W)
    h, w = img["orig_hw"]
    logits = np.array(np.asarray(logits)[:n, :h, :w])  # a copy: writable, and not holding the padded buffer
    return Prediction(masks=logits > 0, logits=logits, scores=np.array(np.asarray(iou)[:n]))


def encode_prompts(tokenizer, prompts, name: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """`tokenizer.encode_batch` of a str or an iterable of str, each checked (PromptError, "prompt <i>" from 0, or
  `name`): not blank, not the bare semantic tag, not a text the tokenizer drops entirely (control characters,
  U+FFFD)."""
  if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, (str, Iterable)):
    raise PromptError(f"prompts must be a str or an iterable of str, got a {type(prompts).__name__}")
  # One list up front: a generator would be used up by the checks below.
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise PromptError("no prompts given")
  label = (lambda i: name) if name else (lambda i: f"prompt {i}")
  check_prompts(prompts, label, PromptError)
  input_ids, attention_mask = tokenizer.encode_batch(prompts)
  for i, n in enumerate(attention_mask.sum(axis=1)):
    if n <= 2:  # "<s></s>": nothing of the text is left
      raise PromptError(f"{label(i)} has no text the tokenizer keeps: {prompts[i][:40]!r}")
  return input_ids, attention_mask
