"""The analyze and export commands as importable functions (the command line only calls these).

- `run_analyze`: a zoo model by name, with its parameters from a checkpoint or He-normal random
  weights, decomposed with the config's `sd` options; dense and SD side by side (table, Markdown,
  JSON or CSV) and, on request, PNG plots.
- `run_export`: a checkpoint (dense parameters, decomposed first, or an SD `.npz` written by
  `--mode=decompose --output=...`) to one packed file; prints the measured bytes beside the
  analyzer's storage count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sd_jax import models
from sd_jax.models.synthetic import he_normal_params
from sd_jax.core import blocking, packing
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import NetworkDecomposition, decompose_network, path_name
from sd_jax.cost import analysis as analysis_lib
from sd_jax.cost import hardware, layers, tables
from sd_jax.nn.rules import SDRules

# Defaults of the `cost` config section; a config's `cost` entries override them.
COST_DEFAULTS = dict(
    table="horowitz45nm", dense_bits=32, sd_weight_bits=8, sd_activation_bits=8, basis_bits=32,
    buffer_kib=108.0, pe_count=168, dataflow="weight_stationary", skip_zeros=True,
    inference_batch=1, training_batch=128, dataset_size=50000,
)
# The dense low-precision baseline: weights, activations and gradients at this width, integer arithmetic
# (the class of baseline the paper's training claims are measured against).
INT8_BITS = 8


def model_input(name: str, num_classes: int | None = None, image_size: int | None = None, channels: int = 3,
                sd: bool | SDRules = False) -> tuple[Any, tuple]:
    """The zoo model `name` and its input shape (1, side, side, channels): ImageNet forms 224 / 1000
    classes, else 32 / 10, unless given (a dataset's geometry, e.g. Fashion-MNIST 28 and 1 channel)."""
    imagenet = name.endswith("_imagenet")
    model = models.get(name, num_classes=num_classes or (1000 if imagenet else 10), sd=sd)
    side = image_size or (224 if imagenet else 32)
    return model, (1, side, side, channels)


def _shapes(model: Any, shape: tuple) -> Any:
    """The model's variables as ShapeDtypeStructs, the template a loaded tree is arranged like."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros(shape), train=False))


def _sd_options(config: Any) -> tuple[list, int, dict[str, Any]]:
    options = dict(config.sd.to_dict()) if config is not None and "sd" in config else {}
    rules = [tuple(rule) for rule in options.pop("rules", [])]
    return rules, options.pop("max_kernel_size", 5), options


def cost_options(config: Any) -> dict[str, Any]:
    """COST_DEFAULTS overridden by the config's `cost` section; unknown keys raise ValueError."""
    given = dict(config.cost.to_dict()) if config is not None and "cost" in config else {}
    unknown = sorted(set(given) - set(COST_DEFAULTS))
    if unknown:
        raise ValueError(f"config.cost has unknown key(s) {unknown}; known: {sorted(COST_DEFAULTS)}")
    return dict(COST_DEFAULTS, **given)


def decomposed(model_name: str, params_path: str | None, config: Any, **model_kwargs: Any):
    """(model, input shape, parameters, their decomposition) for `model_name`."""
    from sd_jax.train import checkpoint

    model, shape = model_input(model_name, **model_kwargs)
    if params_path:
        params = checkpoint.arrange_like(checkpoint.load_params(params_path), _shapes(model, shape)["params"])
    else:
        params = he_normal_params(model, shape)
    rules, max_kernel_size, options = _sd_options(config)
    return model, shape, params, decompose_network(params, rules, max_kernel_size=max_kernel_size, **options)


def analysis_of(network: layers.Network, model_name: str, options: Mapping[str, Any]) -> analysis_lib.Analysis:
    """Dense (options.dense_bits, float at 32) and dense 8-bit (int) against SD (8-bit int by default),
    all on one table and one accelerator."""
    table = tables.get(options["table"])
    common = dict(buffer_kib=options["buffer_kib"], pe_count=options["pe_count"], dataflow=options["dataflow"],
                  skip_zeros=options["skip_zeros"], basis_bits=options["basis_bits"])
    dense_hw = hardware.hardware(table, weight_bits=options["dense_bits"], activation_bits=options["dense_bits"],
                                 **common)
    int8_hw = hardware.hardware(table, weight_bits=INT8_BITS, activation_bits=INT8_BITS, gradient_bits=INT8_BITS,
                                **common)
    sd_hw = hardware.hardware(table, weight_bits=options["sd_weight_bits"],
                              activation_bits=options["sd_activation_bits"], **common)
    steps = math.ceil(options["dataset_size"] / options["training_batch"])
    return analysis_lib.analyze(network, model_name, unit=table.unit, dense_hardware=dense_hw, sd_hardware=sd_hw,
                                int8_hardware=int8_hw, inference_batch=options["inference_batch"],
                                training_batch=options["training_batch"], steps_per_epoch=steps)


def run_analyze(
    config: Any, model_name: str, params_path: str | None = None, *, output_format: str = "text",
    plots_dir: str | None = None, **model_kwargs: Any,
) -> str:
    """Analyze `model_name` dense (float32 and 8-bit) and SD; returns the report in `output_format`
    (text, markdown, json, csv).

    With `params_path` holding SD variables (a trained SD run) and no `cost` section in `config`, the
    SD side is counted at the run's own numerics: `sd.activation_bits` (e.g. 8) or, without it,
    `dense_bits` for weights and activations, so only the SD weight storage, traffic and rebuild differ
    from the dense view at those numerics (dense float32, or the dense 8-bit baseline for an 8-bit run)."""
    if output_format not in analysis_lib.FORMATS:
        raise ValueError(f"output format {output_format!r} is not one of {sorted(analysis_lib.FORMATS)}")
    options = cost_options(config)
    network = _trained_sd_network(config, model_name, params_path, **model_kwargs) if params_path else None
    if network is not None and "cost" not in config:  # count the numerics the run trained with
        bits = config.sd.get("activation_bits") or options["dense_bits"]
        options.update(sd_weight_bits=bits, sd_activation_bits=bits)
    if network is None:
        model, shape, _, decomposition = decomposed(model_name, params_path, config, **model_kwargs)
        network = layers.extract_layers(model, shape, decomposition=decomposition, train=False)
    result = analysis_of(network, model_name, options)
    if plots_dir:
        os.makedirs(plots_dir, exist_ok=True)
        analysis_lib.plot_energy(result, os.path.join(plots_dir, f"{model_name}_energy.png"))
        analysis_lib.plot_storage(result, os.path.join(plots_dir, f"{model_name}_storage.png"))
    return analysis_lib.FORMATS[output_format](result)


def _trained_sd_network(config: Any, model_name: str, params_path: str, **model_kwargs: Any) -> layers.Network | None:
    """The layers of an SD model with the variables at `params_path` (the checkpoints of an SD training
    run, or `--mode=decompose --output`) as they are, or None when those variables are dense.

    The model is built with the config's `sd` section, so pass the config the run trained with."""
    from sd_jax.train import checkpoint

    variables = checkpoint.load_variables(params_path)
    if not (isinstance(variables, Mapping) and "sd_coeff" in variables):
        return None
    rules, max_kernel_size, options = _sd_options(config)
    model, shape = model_input(model_name, sd=SDRules(rules, max_kernel_size=max_kernel_size, **options),
                               **model_kwargs)
    template = _shapes(model, shape)
    variables = {name: checkpoint.arrange_like(tree, template[name]) if name in template else tree
                 for name, tree in variables.items()}
    return layers.extract_layers(model, shape, variables=variables, train=False)


def packable(decomposition: NetworkDecomposition) -> dict[str, packing.SDTensor | np.ndarray]:
    """Tensors to pack from a decomposition: 'params/<path>' for every leaf, SD kernels bit-packed."""
    leaves = jax.tree_util.tree_flatten_with_path(
        decomposition.tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition))[0]
    return {f"params/{path_name(path)}": packing.SDTensor.from_decomposition(leaf)
            if isinstance(leaf, Decomposition) else np.asarray(leaf) for path, leaf in leaves}


def _inference_state(path: str) -> dict[str, np.ndarray]:
    """'batch_stats/<path>' arrays of a checkpoint that has them, so the packed file can serve alone."""
    from sd_jax.train import checkpoint

    variables = checkpoint.load_variables(path)
    stats = variables.get("batch_stats") if isinstance(variables, Mapping) else None
    if not isinstance(stats, Mapping):
        return {}
    return {f"batch_stats/{key}": value for key, value in checkpoint.flatten(stats).items()}


def _sd_checkpoint(path: str, network: layers.Network, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """Tensors from an SD `.npz` (keys 'sd_coeff/<layer>/kernel', ...), or None for a dense checkpoint."""
    if not path.endswith(".npz"):
        return None
    with np.load(path, allow_pickle=False) as data:
        flat = {key: data[key] for key in data.files if not key.startswith("__")}
    if not any(key.startswith("sd_coeff/") for key in flat):
        return None
    kernels = {f"{layer.name}/kernel": layer for layer in network.layers}
    tensors: dict[str, Any] = {}
    for key, value in flat.items():
        collection, _, name = key.partition("/")
        if collection == "params":
            tensors[key] = value
        elif collection == "sd_coeff":
            if name not in kernels:
                raise ValueError(f"{path}: SD kernel '{name}' is not a layer of the model; pass the model it "
                                 "was decomposed from (--model)")
            layer = kernels[name]
            spec = blocking.block_spec(layer.kernel_shape, layer.kind, group_size=options.get("group_size", 64),
                                       row_length=options.get("row_length", 3),
                                       max_rows=options.get("max_rows", 192), name=name)
            coeff = np.where(flat[f"sd_mask/{name}"], value, np.float32(0)).astype(np.float32)
            scale = flat.get(f"sd_row_scale/{name}")
            tensors[f"params/{name}"] = packing.SDTensor(coeff, flat[f"sd_basis/{name}"].astype(np.float32), spec,
                                                         None if scale is None else scale.astype(np.float32))
    return tensors


def storage_count_bits(tensors: Mapping[str, packing.SDTensor | np.ndarray]) -> int:
    """The analyzer's storage count of what a packed file holds: SD kernels by `SDStats`, arrays at 32 bits."""
    bits = 0
    for tensor in tensors.values():
        if isinstance(tensor, packing.SDTensor):
            scale = 0 if tensor.row_scale is None else tensor.row_scale.size * 32
            bits += layers.sd_stats(tensor.coeff, tensor.basis.shape).storage_bits + scale
        else:
            bits += analysis_lib.OTHER_PARAM_BITS * tensor.size
    return bits


def run_export(config: Any, model_name: str, params_path: str, output: str, *, basis_dtype: str = "float32",
               **model_kwargs: Any) -> str:
    """Pack the checkpoint at `params_path` into `output`; returns measured bytes beside the storage count."""
    _, _, options = _sd_options(config)
    model, shape = model_input(model_name, **model_kwargs)
    tensors = _sd_checkpoint(params_path, layers.extract_layers(model, shape, train=False), options)
    if tensors is None:
        tensors = packable(decomposed(model_name, params_path, config, **model_kwargs)[3])
    tensors.update(_inference_state(params_path))
    size = packing.save(output, tensors, basis_dtype=basis_dtype)
    with open(output, "rb") as stream:
        header = packing.header_bytes(stream.read())
    count = storage_count_bits(tensors)
    sd = sum(isinstance(t, packing.SDTensor) for t in tensors.values())
    return "\n".join([
        f"wrote {output}: {size:,} bytes ({header:,} header and checksum, {size - header:,} payload), "
        f"{sd} SD kernels, {len(tensors) - sd} other arrays, B as {basis_dtype}",
        f"analyzer storage count: {count:,} bits = {count / 8:,.1f} bytes "
        f"(payload / count = {(size - header) * 8 / count:.4f}; B counted at 32 bits)",
    ])
