"""sd_jax: SmartDeal (W = C·B, C sparse powers of two) for JAX and Flax."""

from sd_jax.core.decompose import Decomposition, DecomposeOptions, decompose

__all__ = ["Decomposition", "DecomposeOptions", "decompose"]
