"""Pallas kernels for SD inference: W = C·B rebuilt on chip, never in HBM (docs/kernels.md).

Beside sd_jax.core: imports sd_jax.core only, and nothing in core imports it.
"""

from sd_jax.kernels.sd_matmul import DTYPES, PackedSD, pack, rebuild, sd_conv, sd_matmul

__all__ = ["DTYPES", "PackedSD", "pack", "rebuild", "sd_conv", "sd_matmul"]
