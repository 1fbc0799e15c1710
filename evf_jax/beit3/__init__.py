"""BEiT-3 (torchscale multiway transformer) in Flax: the text/image fusion encoder of EVF-SAM."""

from evf_jax.beit3.config import Beit3Config, PRESETS
from evf_jax.beit3.model import Beit3, abstract_params, dummy_inputs

__all__ = ["Beit3", "Beit3Config", "PRESETS", "abstract_params", "dummy_inputs"]
