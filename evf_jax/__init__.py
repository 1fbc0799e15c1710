"""evf-jax: EVF-SAM (text-prompted Segment Anything) in JAX/Flax.

    from evf_jax import Predictor, load_image
    p = Predictor.from_checkpoint("checkpoints/evf-sam")
    p.set_image(load_image("zebra.jpg"))
    masks = p.predict(["zebra top left", "[semantic] sky"]).masks
"""

__version__ = "0.2.0"

from evf_jax.checkpoints import load_checkpoint, save_model  # noqa: E402
from evf_jax.errors import UserError  # noqa: E402
from evf_jax.evf import EvfConfig, EvfSam  # noqa: E402
from evf_jax.images import decode_image, load_image  # noqa: E402
from evf_jax.predictor import Prediction, Predictor  # noqa: E402

__all__ = ["EvfConfig", "EvfSam", "Prediction", "Predictor", "UserError", "decode_image", "load_checkpoint",
           "load_image", "save_model", "__version__"]
