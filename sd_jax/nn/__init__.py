"""Flax linen layers for SmartDeal and dense -> SD conversion of variables."""
from sd_jax.nn.convert import sd_variables
from sd_jax.nn.layers import MODES, SD_BASIS, SD_COEFF, SD_COLLECTIONS, SD_MASK, SDConv, SDDense

__all__ = ["MODES", "SD_BASIS", "SD_COEFF", "SD_COLLECTIONS", "SD_MASK", "SDConv", "SDDense", "sd_variables"]
