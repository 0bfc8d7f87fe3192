"""A hardware description as a pytree of numbers, so energy functions can be `vmap`ped over many.

Built from an energy table and bit widths by `hardware(...)`; every field is a float32 array (a
scalar for one description, shape (n,) for a sweep of n, see `stack` and `sweep`).

Model (docs/method.md 1.5): three memory levels (DRAM, a global buffer of `buffer_bits`, per-PE register
files) and an array of `pe_count` processing elements. `output_stationary` selects the dataflow: 0
keeps weights in the PE registers (weight-stationary), 1 keeps partial sums there
(output-stationary); see `sd_jax.cost.energy` for the access counts each implies. `skip_zeros` (0/1)
lets the SD rebuild skip zero coefficients. Arithmetic: `mac` is one multiply at the operand width
plus one add at the accumulator width; `add` is one add at the weight width, the cost of one
shift-and-add step of the SD rebuild (the shift is wiring) and of one weight-update operation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sd_jax.cost import tables

DATAFLOWS = ("weight_stationary", "output_stationary")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hardware:
    """Unit energies (in the table's unit), capacities, bit widths and workload of one accelerator."""

    dram_per_bit: jax.Array
    buffer_per_bit: jax.Array
    register_per_bit: jax.Array
    mac: jax.Array
    add: jax.Array
    buffer_bits: jax.Array
    pe_count: jax.Array
    weight_bits: jax.Array
    activation_bits: jax.Array
    stored_activation_bits: jax.Array  # the activations kept for the backward pass, as stored
    gradient_bits: jax.Array
    accumulator_bits: jax.Array
    basis_bits: jax.Array
    optimizer_bits: jax.Array
    output_stationary: jax.Array
    skip_zeros: jax.Array
    batch: jax.Array


def _dtype(bits: int, arithmetic: str) -> str:
    return f"fp{bits}" if arithmetic == "float" else f"int{bits}"


def hardware(
    table: str | tables.EnergyTable = "horowitz45nm",
    *,
    weight_bits: int = 32,
    activation_bits: int = 32,
    stored_activation_bits: int | None = None,
    gradient_bits: int | None = None,
    accumulator_bits: int | None = None,
    basis_bits: int = 32,
    optimizer_bits: int = 32,
    arithmetic: str | None = None,
    buffer_kib: float = 108.0,
    pe_count: int = 168,
    dataflow: str = "weight_stationary",
    skip_zeros: bool = True,
    batch: int = 1,
) -> Hardware:
    """One description; defaults follow Eyeriss (108 KiB global buffer, 168 PEs), batch 1.

    `arithmetic` is "float" or "int" (default: float at 32 bits, int below). Gradients and the
    activations stored for the backward pass (`stored_activation_bits`: e.g. 4 for a run with
    `sd.stored_activation_bits=4`) default to the activation width, the accumulator to 32 bits. Raises ValueError for a bad size or a width the
    table has no energy for.
    """
    table = tables.get(table) if isinstance(table, str) else table
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow {dataflow!r} is not one of {DATAFLOWS}")
    gradient_bits = activation_bits if gradient_bits is None else gradient_bits
    stored_activation_bits = stored_activation_bits or activation_bits
    accumulator_bits = 32 if accumulator_bits is None else accumulator_bits
    sizes = dict(weight_bits=weight_bits, activation_bits=activation_bits,
                 stored_activation_bits=stored_activation_bits, gradient_bits=gradient_bits,
                 accumulator_bits=accumulator_bits, basis_bits=basis_bits, optimizer_bits=optimizer_bits,
                 buffer_kib=buffer_kib, pe_count=pe_count, batch=batch)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"hardware: {name}={value!r} must be a positive number")
    arithmetic = arithmetic or ("float" if max(weight_bits, activation_bits) >= 32 else "int")
    if arithmetic not in ("float", "int"):
        raise ValueError(f"hardware: arithmetic={arithmetic!r} must be 'float' or 'int'")
    operand = _dtype(max(weight_bits, activation_bits), arithmetic)
    accumulator = _dtype(accumulator_bits, arithmetic)
    if f"mac_{operand}" in table.entries:
        mac = table.operation("mac", operand)
    else:
        mac = table.operation("mult", operand) + table.operation("add", accumulator)
    values = dict(
        dram_per_bit=table.per_bit("dram"), buffer_per_bit=table.per_bit("buffer"),
        register_per_bit=table.per_bit("register"), mac=mac,
        add=table.operation("add", _dtype(weight_bits, arithmetic)),
        buffer_bits=buffer_kib * 8192, pe_count=pe_count, weight_bits=weight_bits,
        activation_bits=activation_bits, stored_activation_bits=stored_activation_bits,
        gradient_bits=gradient_bits, accumulator_bits=accumulator_bits,
        basis_bits=basis_bits, optimizer_bits=optimizer_bits,
        output_stationary=float(dataflow == "output_stationary"), skip_zeros=float(skip_zeros), batch=batch,
    )
    return Hardware(**{key: jnp.asarray(value, jnp.float32) for key, value in values.items()})


def stack(descriptions: list[Hardware]) -> Hardware:
    """Descriptions stacked along a new leading axis, for `vmap`."""
    if not descriptions:
        raise ValueError("stack: pass at least one Hardware description")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *descriptions)


def sweep(base: Hardware, **fields: jax.Array) -> Hardware:
    """`base` with the named fields replaced by 1-D arrays of one length n; the rest broadcast to (n,)."""
    if not fields:
        raise ValueError("sweep: name at least one hardware field to vary, e.g. buffer_bits=...")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Hardware)})
    if unknown:
        raise ValueError(f"sweep: unknown hardware field(s) {unknown}; fields are "
                         f"{[f.name for f in dataclasses.fields(Hardware)]}")
    arrays = {key: jnp.asarray(value, jnp.float32) for key, value in fields.items()}
    lengths = {key: value.shape for key, value in arrays.items()}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"sweep: pass 1-D arrays of one length, got shapes {lengths}")
    if any(bool(jnp.any(value < 0)) for value in arrays.values()):
        raise ValueError(f"sweep: negative values in {[k for k, v in arrays.items() if bool(jnp.any(v < 0))]}")
    n = next(iter(lengths.values()))[0]
    return Hardware(**{
        f.name: arrays.get(f.name, jnp.broadcast_to(getattr(base, f.name), (n,)))
        for f in dataclasses.fields(Hardware)
    })
