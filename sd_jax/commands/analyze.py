"""`--mode=analyze`: energy and storage of a model, dense (float32 and 8-bit) and SD side by side.

The SD side is, by what `params_path` holds: nothing (He-normal random weights) or dense parameters,
decomposed with the config's `sd` rules (per layer for its storage or energy target,
`sd_jax.nn.allocate`); or SD variables (a trained SD run, `--mode=decompose --output`), counted as they
are, in the SD model the config's `sd` section describes.
"""

from __future__ import annotations

from typing import Any

from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.core.network import NetworkDecomposition
from sd_jax.cost import analysis as analysis_lib
from sd_jax.cost import layers
from sd_jax.cost.comparison import analysis_of, cost_options
from sd_jax.nn import convert
from sd_jax.nn.rules import SDRules


def decomposed(params: Any, rules: SDRules) -> NetworkDecomposition:
    """Dense `params` decomposed by `rules` (one batched call; a rule that names no layer raises ValueError)."""
    return convert.to_sd({"params": params}, rules)[1]


def network_of(config: Any, target: inputs.Target, params_path: str | None) -> tuple[layers.Network, bool]:
    """(the layers of `target` to count, True when they hold trained SD variables rather than a decomposition)."""
    rules = SDRules.from_config(config)
    variables = inputs.read_variables(params_path) if params_path else None
    if variables is not None and inputs.is_sd(variables):
        model = target.build(rules)
        placed = inputs.arranged(variables, model, target, params_path)
        return layers.extract_layers(model, target.input_shape, variables=placed, train=False), True
    params = inputs.dense_params(target, params_path)
    rules = inputs.targeted_rules(config, {"params": params}, target.name)[0]
    return layers.extract_layers(target.build(), target.input_shape, decomposition=decomposed(params, rules),
                                 train=False), False


def analyze(config: Any, params_path: str | None = None, *, model_name: str | None = None,
            output_format: str = "text", plots_dir: str | None = None) -> str:
    """The report in `output_format` (text, markdown, json, csv); PNG plots into `plots_dir` on request.

    Trained SD variables with no `cost` section in `config` are counted at the run's own numerics:
    `sd.activation_bits` (e.g. 8) or, without it, `dense_bits` for weights and activations, so only the
    SD weight storage, traffic and rebuild differ from the dense view at those numerics. The training
    storage counts the activations kept for the backward pass at `cost.stored_activation_bits`, or else
    the run's `sd.stored_activation_bits` (both 0: at the activation width)."""
    if output_format not in analysis_lib.FORMATS:
        raise ValueError(f"output format {output_format!r} is not one of {sorted(analysis_lib.FORMATS)}")
    options = cost_options(config)
    target = inputs.target_of(config, model_name)
    network, trained = network_of(config, target, params_path)
    if trained and (config is None or "cost" not in config):
        bits = (config.sd.get("activation_bits") if config is not None and "sd" in config else None) \
            or options["dense_bits"]
        options.update(sd_weight_bits=bits, sd_activation_bits=bits)
    if config is not None and "sd" in config and not options["stored_activation_bits"]:
        options["stored_activation_bits"] = config.sd.get("stored_activation_bits") or 0
    name = target.name
    result = analysis_of(network, name, options)
    if plots_dir:
        directory = sd_io.as_path(plots_dir)
        directory.mkdir(parents=True, exist_ok=True)
        analysis_lib.plot_energy(result, str(directory / f"{name}_energy.png"))
        analysis_lib.plot_storage(result, str(directory / f"{name}_storage.png"))
    return analysis_lib.FORMATS[output_format](result)
