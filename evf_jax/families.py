"""The two model families a checkpoint can hold, and what differs between them outside the models.

  EVF-SAM   (`evf_jax.evf`, model_type "evf"):          SAM-1 ViT; the image resized on its longest side with PIL
            bilinear and zero-padded to a square; single-mask decoding; the postprocess crops the padding.
  EVF-SAM2  (`evf_jax.evf_sam2`, model_type "evf_sam2"): SAM-2 Hiera; the whole image stretched to a square with
            torch's uint8 bilinear (`evf_jax.sam2.transforms`); the best of masks 1-3 by predicted IoU
            (`EvfSam2.decode`); the low-res logits resized straight to the original size (no crop).

Both models have the same methods (`embed_image`, `text_prompts`, `decode`) with the same outputs, apart from
what `embed_image` returns (an array, or SAM-2's (embedding, high-res features)), so `Predictor` runs either with
one code path and an `ImageInput` for the host-side frame and the postprocess matrices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np

from evf_jax import evf, evf_sam2, postprocess
from evf_jax.evf import EvfConfig, EvfSam
from evf_jax.evf_sam2 import EvfSam2, EvfSam2Config
from evf_jax.images import ImageReadError
from evf_jax.sam import transforms as sam_transforms
from evf_jax.sam2 import transforms as sam2_transforms

ModelConfig = Union[EvfConfig, EvfSam2Config]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str                            # as the README names it
  model_type: str                      # `model_type` in a converted checkpoint's model_config.json
  config_class: type
  model_class: type
  abstract_params: Callable[..., Any]  # (config, *, param_dtype, boxed) -> ShapeDtypeStruct tree
  init_params: Callable[..., Any]      # (config, rng, *, param_dtype) -> random parameters
  eigen_dots_encoder: bool = False     # the image encoder compiles its dots through Eigen on the CPU (runtime.py)


FAMILIES = (Family("EVF-SAM", evf.MODEL_TYPE, EvfConfig, EvfSam, evf.abstract_params, evf.init_params),
            Family("EVF-SAM2", evf_sam2.MODEL_TYPE, EvfSam2Config, EvfSam2, evf_sam2.abstract_params,
                   evf_sam2.init_params, eigen_dots_encoder=True))
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family_of(config: ModelConfig) -> Family:
  for f in FAMILIES:
    if isinstance(config, f.config_class):
      return f
  raise TypeError(f"not an EVF-SAM or EVF-SAM2 config: {type(config).__name__}")


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """The SAM side of one family's inference: the model frame, its normalisation and the mask postprocess.

  square: SAM-2's stretch to size x size (no padding, logits resized straight to the original size); otherwise
  SAM-1's longest-side resize with padding, cropped again in the postprocess. `frame` is the inference path's
  resize; evaluation frames images in `data_pipelines` (`sam_mode`, as the original's eval.py: PIL bilinear).
  """
  size: int
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  low_res: int
  square: bool

  def frame(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 (H, W, 3) -> ((size, size, 3) uint8 frame, the image's (h', w') inside it)."""
    if self.square:
      hw = (self.size, self.size)
      return sam2_transforms.resize_uint8_bilinear(image, hw), hw
    return sam_transforms.to_frame(image, self.size)

  def check_fits(self, hw: tuple[int, int], name: str = "the image") -> None:
    """ImageReadError for an image SAM-1's resize would make 0 pixels across (e.g. 5000 x 1)."""
    h, w = hw
    if not self.square and 0 in sam_transforms.frame_hw(h, w, self.size):
      raise ImageReadError(f"{name} is {w}x{h}: too thin for this model, which scales the longest side to "
                           f"{self.size} pixels (the short side would round to 0); crop or pad it first")

  def normalize(self, frames: jax.Array, input_hw: jax.Array) -> jax.Array:
    """(B, size, size, 3) uint8 frames -> float32 model input (on device; zero outside input_hw)."""
    return sam_transforms.normalize_and_pad(frames, input_hw, self.size, self.pixel_mean, self.pixel_std)

  def mask_matrices(self, input_hw: tuple[int, int], original_hw: tuple[int, int],
                    pad_to: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
    return mask_matrices(input_hw, original_hw, square=self.square, low_res=self.low_res, img_size=self.size,
                         pad_to=pad_to)


def mask_matrices(input_hw: tuple[int, int], original_hw: tuple[int, int], *, square: bool, low_res: int,
                  img_size: int, pad_to: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
  """(A_y, A_x) for `postprocess.apply_matrices`: low-res logits -> the original size (rows zero-padded to
  pad_to), SAM-2's way (`square`: straight to the original size) or SAM-1's (crop (h', w') of the frame)."""
  if square:
    return evf_sam2.postprocess_matrices(original_hw, low_res, pad_to=pad_to)
  return postprocess.mask_postprocess_matrices(input_hw, original_hw, low_res=low_res, img_size=img_size,
                                               pad_to=pad_to)


def image_input(config: ModelConfig) -> ImageInput:
  if isinstance(config, EvfSam2Config):
    s = config.sam2
    return ImageInput(s.image_size, s.pixel_mean, s.pixel_std, s.low_res_size, square=True)
  s = config.sam
  return ImageInput(s.img_size, s.pixel_mean, s.pixel_std, s.low_res_size, square=False)
