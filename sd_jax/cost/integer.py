"""Operations of integer-only SD inference (`sd_jax.serve.integer`) and their energy, per layer.

Per example at batch 1, for each conv / dense layer of a `Network`:
- `int8_macs`: the layer's effective MACs (`energy.ENERGY_MACS`), int8 x int8 into an int32 accumulator.
- `rebuild_shifts`, `rebuild_adds` (SD layers): W_int = sum_k ±(B_int8 << shift) takes one shift and
  one add per non-zero of C and column of B, nonzeros * k of each (zero coefficients are skipped).
- `weight_requantizations` (SD layers): the rebuilt W_int back to int8, one fixed-point multiply per
  weight entry.
- `output_requantizations`: the int32 accumulator (plus its bias) to uint8, one fixed-point multiply
  per output value; the logits' final dequantization is counted here too.
Residual adds and average pooling (two multiplies per block output, one per pooled value) are outside
the conv / dense layers a `Network` lists and are not counted.

Energy (`integer_energy`): an int8 MAC costs mult_int8 + add_int32; a shift is wiring (as in
`sd_jax.cost.hardware`) and a rebuild add costs add_int32 (W_int needs up to 8 + 3 + the exponent
span bits); a fixed-point multiply costs mult_int32 + add_int32 (the product and its rounding). The
Horowitz table has every one of these entries; a table without them raises ValueError naming the entry.
`integer_inference_energy` adds the data movement of the access model (`sd_jax.cost.energy`) at 8-bit
weights, activations and B. `integer_view` is what the analyzer reports: the operations always, the
energy where the table prices it (`missing_entries` names what a table such as Eyeriss's lacks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.cost import energy as energy_lib
from sd_jax.cost import hardware as hardware_lib
from sd_jax.cost import tables
from sd_jax.cost.layers import Network

Array = jax.Array

INT_BITS = 8  # weights, activations and B of the integer path
# Entries `integer_inference_energy` reads: the access model's memories and 8-bit arithmetic, and its own.
ENTRIES = ("dram", "buffer", "register", "mult_int8", "add_int8", "add_int32", "mult_int32")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntegerOps:
    """Per-layer operation counts (L,) of integer-only inference, per example (module docstring)."""

    int8_macs: Array
    rebuild_shifts: Array
    rebuild_adds: Array
    weight_requantizations: Array
    output_requantizations: Array


def integer_ops(network: Network) -> IntegerOps:
    """The integer path's operations of every layer of `network` (SD statistics where it has them)."""
    def column(value) -> Array:
        return jnp.asarray(np.array([value(layer) for layer in network.layers], np.float64), jnp.float32)

    steps = column(lambda layer: layer.sd.nonzeros * layer.sd.k if layer.sd is not None else 0)
    return IntegerOps(
        int8_macs=column(lambda layer: getattr(layer, energy_lib.ENERGY_MACS)),
        rebuild_shifts=steps, rebuild_adds=steps,
        weight_requantizations=column(lambda layer: layer.weights if layer.sd is not None else 0),
        output_requantizations=column(lambda layer: layer.outputs),
    )


def integer_energy(ops: IntegerOps, table: str | tables.EnergyTable = "horowitz45nm") -> dict[str, Array]:
    """Arithmetic energy per layer (L,) in the table's unit: {"mac", "rebuild", "requantization"}."""
    table = tables.get(table) if isinstance(table, str) else table
    add32 = table.operation("add", "int32")
    fixed_point_multiply = table.operation("mult", "int32") + add32
    return dict(
        mac=ops.int8_macs * (table.operation("mult", "int8") + add32),
        rebuild=ops.rebuild_adds * add32,
        requantization=(ops.weight_requantizations + ops.output_requantizations) * fixed_point_multiply,
    )


def integer_inference_energy(network: Network, table: str | tables.EnergyTable = "horowitz45nm",
                             **hardware_options) -> dict[str, Array]:
    """Energy per example of integer-only SD inference, per layer: the access model's "dram",
    "buffer" and "register" at 8 bits (`hardware_options` go to `hardware.hardware`, e.g. buffer_kib)
    and the arithmetic of `integer_energy`."""
    hw = hardware_lib.hardware(table, weight_bits=INT_BITS, activation_bits=INT_BITS, basis_bits=INT_BITS,
                               **hardware_options)
    moved = energy_lib.energy(energy_lib.layer_counts(network), hw)["inference"]
    return dict({part: moved[part] for part in ("dram", "buffer", "register")},
                **integer_energy(integer_ops(network), table))


def missing_entries(table: str | tables.EnergyTable) -> tuple[str, ...]:
    """The entries of ENTRIES that `table` lacks: empty when it prices integer-only inference."""
    table = tables.get(table) if isinstance(table, str) else table
    return tuple(entry for entry in ENTRIES if entry not in table.entries)


@dataclasses.dataclass(frozen=True)
class IntegerView:
    """Integer-only SD inference of one network for a report: per-layer operations and, when `table`
    prices them, per-layer energies by part (`integer_inference_energy`; else None, `missing` says why)."""

    table: str
    ops: IntegerOps
    energy: dict[str, np.ndarray] | None
    missing: tuple[str, ...] = ()


def integer_view(network: Network, table: str | tables.EnergyTable = "horowitz45nm",
                 **hardware_options) -> IntegerView:
    """`integer_ops` of `network` and, where `table` has every entry of ENTRIES, `integer_inference_energy`."""
    table = tables.get(table) if isinstance(table, str) else table
    missing = missing_entries(table)
    energy = None if missing else jax.device_get(integer_inference_energy(network, table, **hardware_options))
    return IntegerView(table.name, jax.device_get(integer_ops(network)), energy, missing)
