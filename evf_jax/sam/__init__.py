"""Segment Anything (SAM) in Flax, mirroring `segment_anything/modeling`."""

from evf_jax.sam.config import SAM_CONFIGS, SamConfig
from evf_jax.sam.sam import Sam, abstract_params, dummy_inputs, init_params

__all__ = ["SAM_CONFIGS", "SamConfig", "Sam", "abstract_params", "dummy_inputs", "init_params"]
