"""`--mode=export`: a checkpoint to one packed file (`sd_jax.core.packing`), with the measured bytes beside
the analyzer's storage count.

SD variables (a trained SD run, `--mode=decompose --output`) are packed as the SD model the config
describes uses them (q(C) ⊙ mask and B, `sd_jax.nn.convert.sd_tree`); dense parameters are decomposed
first with the config's `sd` rules. Batch-norm statistics travel along, so the file serves alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.commands.analyze import decomposed
from sd_jax.core import packing
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import path_name
from sd_jax.cost import analysis as analysis_lib
from sd_jax.cost import layers
from sd_jax.nn import allocate, convert
from sd_jax.nn.rules import SDRules


def packable(tree: Any) -> dict[str, packing.SDTensor | np.ndarray]:
    """Tensors to pack from a parameter tree with `Decomposition` kernels: 'params/<path>' for every leaf,
    SD kernels bit-packed."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition))[0]
    return {f"params/{path_name(path)}": packing.SDTensor.from_decomposition(leaf)
            if isinstance(leaf, Decomposition) else np.asarray(leaf) for path, leaf in leaves}


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


def sd_parameter_tree(config: Any, params_path: str, model_name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(the parameter tree with SD kernels as `Decomposition`s, the variables read) for `params_path`."""
    target = inputs.target_of(config, model_name)
    rules = SDRules.from_config(config)
    variables = inputs.read_variables(params_path)
    if inputs.is_sd(variables):
        model = target.build(rules)
        placed = inputs.arranged(variables, model, target, params_path)
        return convert.sd_tree(model, placed, target.sample(), train=False), variables
    params = inputs.dense_params(target, params_path)
    return decomposed(params, allocate.targeted_rules(config, params)[0]).tree, variables


def export(config: Any, params_path: str, output: str, *, model_name: str | None = None,
           basis_dtype: str = "float32") -> str:
    """Pack the checkpoint at `params_path` into `output`; returns measured bytes beside the storage count."""
    tree, variables = sd_parameter_tree(config, params_path, model_name)
    tensors = packable(tree)
    tensors.update({f"batch_stats/{key}": value for key, value in sd_io.flatten(variables.get("batch_stats", {})).items()})
    data = packing.pack(tensors, basis_dtype=basis_dtype)
    sd_io.atomic_write(output, lambda stream: stream.write(data))
    size, header = len(data), packing.header_bytes(data)
    count = storage_count_bits(tensors)
    sd = sum(isinstance(t, packing.SDTensor) for t in tensors.values())
    return "\n".join([
        f"wrote {output}: {size:,} bytes ({header:,} header and checksum, {size - header:,} payload), "
        f"{sd} SD kernels, {len(tensors) - sd} other arrays, B as {basis_dtype}",
        f"analyzer storage count: {count:,} bits = {count / 8:,.1f} bytes "
        f"(payload / count = {(size - header) * 8 / count:.4f}; B counted at 32 bits)",
    ])
