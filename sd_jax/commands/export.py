"""`--mode=export`: a checkpoint to one packed file (`sd_jax.core.packing`), with the measured bytes beside
the analyzer's storage count.

SD variables (a trained SD run, `--mode=decompose --output`) are packed as the SD model the config
describes uses them (q(C) ⊙ mask and B, `sd_jax.nn.convert.sd_tree`); dense parameters are decomposed
first with the config's `sd` rules. Batch-norm statistics and the model's description (zoo name and
options, SD rules, input shape) travel along, so the file serves alone (`sd_jax.serve.load`).
With `integer_calibration` images, the integer-only form of the packed model (`sd_jax.serve.integer`)
is written beside it (`integer_model_path`), calibrated on the config's first training images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax import io as sd_io
from sd_jax import serve
from sd_jax.commands import inputs
from sd_jax.commands.analyze import decomposed
from sd_jax.core import packing
from sd_jax.cost import analysis as analysis_lib
from sd_jax.cost import layers
from sd_jax.nn import convert
from sd_jax.nn.rules import SDRules
from sd_jax.serve import integer

PACKED_SUFFIX = ".sdpack"
INTEGER_SUFFIX = ".int.npz"


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


def sd_parameter_tree(config: Any, params_path: str, model_name: str | None = None
                      ) -> tuple[Any, dict[str, Any], SDRules]:
    """(the parameter tree with SD kernels as `Decomposition`s, the variables read, in the SD model's nesting
    when they are SD, the SD rules they follow: the config's, or for dense parameters with a storage target
    the allocated per-layer rules) for `params_path`."""
    target = inputs.target_of(config, model_name)
    rules = SDRules.from_config(config)
    variables = inputs.read_variables(params_path)
    if inputs.is_sd(variables):
        model = target.build(rules)
        placed = inputs.arranged(variables, model, target, params_path)
        return convert.sd_tree(model, placed, target.sample(), train=False), placed, rules
    params = inputs.dense_params(target, params_path)
    rules = inputs.targeted_rules(config, {**variables, "params": params}, model_name)[0]
    return decomposed(params, rules).tree, variables, rules


def integer_model_path(output: str) -> str:
    """Where the integer-only model of the packed file `output` goes: model.sdpack -> model.int.npz."""
    return output.removesuffix(PACKED_SUFFIX) + INTEGER_SUFFIX


def export(config: Any, params_path: str, output: str, *, model_name: str | None = None,
           basis_dtype: str = "float32", integer_calibration: int = 0) -> str:
    """Pack the checkpoint at `params_path` into `output`, and with `integer_calibration` > 0 its integer-only
    form, calibrated on that many training images of the config, into `integer_model_path(output)`;
    returns measured bytes beside the storage count."""
    if not isinstance(integer_calibration, int) or integer_calibration < 0:
        raise ValueError(f"integer_calibration={integer_calibration!r} must be a number of training images "
                         "(0: no integer model)")
    tree, variables, rules = sd_parameter_tree(config, params_path, model_name)
    tensors = serve.model_tensors(tree, variables)
    target = inputs.target_of(config, model_name)
    description = serve.ModelDescription(target.name, target.num_classes, target.input_shape,
                                         rules.as_section(), dict(target.options))
    data = serve.pack_model(tensors, description, basis_dtype=basis_dtype)
    sd_io.atomic_write(output, lambda stream: stream.write(data))
    size, header = len(data), packing.header_bytes(data)
    count = storage_count_bits(tensors)
    sd = sum(isinstance(t, packing.SDTensor) for t in tensors.values())
    lines = [
        f"wrote {output}: {size:,} bytes ({header:,} header and checksum, {size - header:,} payload), "
        f"{sd} SD kernels, {len(tensors) - sd} other arrays, B as {basis_dtype}",
        f"analyzer storage count: {count:,} bits = {count / 8:,.1f} bytes "
        f"(payload / count = {(size - header) * 8 / count:.4f}; B counted at 32 bits)",
    ]
    if integer_calibration:
        path = integer_model_path(output)
        served = serve.load(output).quantized(inputs.calibration_images(config, integer_calibration))
        integer.save(served.integer_model, path)
        lines.append(f"wrote {path}: the integer-only model, calibrated on {integer_calibration} training images")
    return "\n".join(lines)
