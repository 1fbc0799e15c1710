"""BEiT-3 (torchscale multiway transformer) in Flax: the text/image fusion encoder of EVF-SAM."""

from evf_jax.beit3.config import PRESETS, Beit3Config
from evf_jax.beit3.model import Beit3, abstract_params, dummy_inputs, init_params

__all__ = ["Beit3", "Beit3Config", "PRESETS", "abstract_params", "dummy_inputs", "init_params"]
