"""evf-jax: EVF-SAM (text-prompted Segment Anything) in JAX/Flax."""

__version__ = "0.1.0"
