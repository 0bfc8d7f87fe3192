"""sd_jax: SmartDeal (W = C·B, C sparse powers of two) for JAX and Flax."""

from sd_jax.core.decompose import Decomposition, DecomposeOptions, decompose
from sd_jax.core.network import NetworkDecomposition, decompose_network

__all__ = ["Decomposition", "DecomposeOptions", "NetworkDecomposition", "decompose", "decompose_network"]
