"""`--mode=decompose`: every kernel of a saved model that the config's `sd` rules select, in SD form.

The output (`.npz` or Orbax directory) holds the variables of the SD model the same config describes,
in the layers' layout (`sd_coeff/<layer>/coeff`, ...), with the other collections of the input (batch
statistics) beside them and the per-layer report: an SD model applies it as it is, and analyze, export
and evaluate read it like a trained SD checkpoint.

With a target (`sd.target_compression`, `sd.target_bytes` or `sd.target_energy_ratio`) each layer's
threshold and pruning fraction are chosen for it first (`sd_jax.nn.allocate`) and written, as rules,
to `<output>.sd_allocation.json`.
"""

from __future__ import annotations

from typing import Any

from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.core import report
from sd_jax.nn import allocate, convert


def decompose(config: Any, params_path: str, output: str | None = None, *, as_json: bool = False) -> str:
    """Decompose the dense variables at `params_path`; write them to `output` (when given); return the
    report (a table, or JSON)."""
    variables = inputs.read_variables(params_path)
    if inputs.is_sd(variables):
        raise ValueError(f"{params_path}: holds SD variables already; pass a dense model's parameters")
    rules, allocation = inputs.targeted_rules(config, variables)
    sd_variables, result = convert.to_sd(variables, rules)
    report_json = report.to_json(result.reports, result.dense_params)
    if output:
        sd_io.save_variables(output, sd_variables, report_json=report_json)
        if allocation is not None:
            allocation.write(allocate.allocation_path(output))
    return report_json if as_json else report.format_table(result.reports, result.dense_params)
