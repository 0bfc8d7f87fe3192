"""The views the analyzer compares, on one energy table and one accelerator: dense at `dense_bits`
(float at 32), dense 8-bit integer (the low-precision baseline of the paper's training claims), SD
(8-bit integer by default) and integer-only SD inference (`sd_jax.cost.integer`), with the options
of a config's `cost` section."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sd_jax.cost import analysis as analysis_lib
from sd_jax.cost import hardware, integer, layers, tables

# Defaults of the `cost` config section; a config's `cost` entries override them.
COST_DEFAULTS = dict(
    table="horowitz45nm", dense_bits=32, sd_weight_bits=8, sd_activation_bits=8, basis_bits=32,
    buffer_kib=108.0, pe_count=168, dataflow="weight_stationary", skip_zeros=True,
    inference_batch=1, training_batch=128, dataset_size=50000,
    # Width of the activations kept for the backward pass in the dense and SD views; 0: their
    # activation width (`analyze` fills in a trained run's sd.stored_activation_bits).
    stored_activation_bits=0,
)
# The dense low-precision baseline: weights, activations and gradients at this width, integer arithmetic.
INT8_BITS = 8


def cost_options(config: Any) -> dict[str, Any]:
    """COST_DEFAULTS overridden by the config's `cost` section; unknown keys raise ValueError."""
    given = dict(config.cost.to_dict()) if config is not None and "cost" in config else {}
    unknown = sorted(set(given) - set(COST_DEFAULTS))
    if unknown:
        raise ValueError(f"config.cost has unknown key(s) {unknown}; known: {sorted(COST_DEFAULTS)}")
    return dict(COST_DEFAULTS, **given)


def _accelerator(options: Mapping[str, Any]) -> dict[str, Any]:
    return dict(buffer_kib=options["buffer_kib"], pe_count=options["pe_count"], dataflow=options["dataflow"],
                skip_zeros=options["skip_zeros"])


def views_hardware(options: Mapping[str, Any]) -> dict[str, hardware.Hardware]:
    """The accelerator description of each view ('dense', 'dense_int8', 'sd') under `cost` options; the
    dense and SD views keep the activations for the backward pass at options.stored_activation_bits (0:
    their activation width)."""
    table = tables.get(options["table"])
    common = dict(_accelerator(options), basis_bits=options["basis_bits"])
    stored = dict(stored_activation_bits=options["stored_activation_bits"] or None)
    return dict(
        dense=hardware.hardware(table, weight_bits=options["dense_bits"], activation_bits=options["dense_bits"],
                                **stored, **common),
        dense_int8=hardware.hardware(table, weight_bits=INT8_BITS, activation_bits=INT8_BITS,
                                     gradient_bits=INT8_BITS, **common),
        sd=hardware.hardware(table, weight_bits=options["sd_weight_bits"],
                             activation_bits=options["sd_activation_bits"], **stored, **common))


def analysis_of(network: layers.Network, model_name: str, options: Mapping[str, Any]) -> analysis_lib.Analysis:
    """Dense (options.dense_bits, float at 32) and dense 8-bit (int) against SD (8-bit int by default) and
    integer-only SD inference, all on one table and one accelerator (`views_hardware`)."""
    table = tables.get(options["table"])
    accelerator = _accelerator(options)
    views = views_hardware(options)
    steps = math.ceil(options["dataset_size"] / options["training_batch"])
    return analysis_lib.analyze(network, model_name, unit=table.unit, dense_hardware=views["dense"],
                                sd_hardware=views["sd"], int8_hardware=views["dense_int8"],
                                inference_batch=options["inference_batch"],
                                training_batch=options["training_batch"], steps_per_epoch=steps,
                                integer=integer.integer_view(network, table, batch=options["inference_batch"],
                                                             **accelerator))
