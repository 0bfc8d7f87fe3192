"""Flax linen layers for SmartDeal, the rules that pick SD layers, dense <-> SD conversion, reports."""
from sd_jax.nn.convert import dense_variables, sd_tree, sd_variables, to_sd
from sd_jax.nn.layers import MODES, SD_BASIS, SD_COEFF, SD_COLLECTIONS, SD_MASK, SDConv, SDDense, SDOptions
from sd_jax.nn.report import ModelReport, model_report
from sd_jax.nn.rules import SDRules
from sd_jax.nn.swap import SwappedModel, swap_layers

__all__ = [
    "MODES", "SD_BASIS", "SD_COEFF", "SD_COLLECTIONS", "SD_MASK", "ModelReport", "SDConv", "SDDense", "SDOptions",
    "SDRules", "SwappedModel", "dense_variables", "model_report", "sd_tree", "sd_variables", "swap_layers", "to_sd",
]
