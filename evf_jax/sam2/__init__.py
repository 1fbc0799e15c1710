"""SAM-2 in Flax, mirroring `sam2/modeling`: the image path and the video memory (`tracking` runs videos)."""

from evf_jax.sam2.config import SAM2_CONFIGS, Sam2Config
from evf_jax.sam2.sam2_base import Sam2, abstract_params, dummy_inputs, init_params

__all__ = ["SAM2_CONFIGS", "Sam2", "Sam2Config", "abstract_params", "dummy_inputs", "init_params"]
