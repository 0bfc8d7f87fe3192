"""Counts and energy per layer, for inference and for a training step (docs/method.md 1.5).

`layer_counts(network, sd=...)` turns extracted layers into per-layer arrays; `energy(counts, hw)`
is a jitted function from counts and one `Hardware` description to per-layer energies (in the
table's unit) and storage (bits); `sweep_energy` is the same function `vmap`ped over descriptions.

Which MACs: the model charges each layer's `effective_macs` (`ENERGY_MACS`), the multiplications
whose input is not zero padding, not the FLOP-counter `macs` that include them. Padding zeros are
never stored or moved, and an accelerator that handles borders (Eyeriss gates zero inputs) does not
multiply them; the reference's model (docs/method.md 1.5) counts the work done and skips zeros.

Access model (per pass over a batch; Eyeriss-style, a deliberately small one). A pass is a
matrix product with M effective MACs, an operand A kept in the dataflow's favour (the weights), a
streamed operand X and an output Y. With P processing elements, an operand of N elements used by M MACs is
read from the buffer max(1, M / (N P)) times per element when streamed (each read feeds up to P
PEs), once when stationary.
- weight-stationary: A is loaded once into the PE registers; partial sums stream through the buffer
  (read and written, at the accumulator width); X is fetched from DRAM once per buffer-sized tile
  of A.
- output-stationary: Y stays in the PEs and is written once; A and X stream; A is fetched from DRAM
  once per buffer-sized tile of Y.
- DRAM: A, X and Y each cross once (times the refetch above); layers are not fused.
- registers: every MAC reads one A and one X element and reads and writes one partial sum.
- SD (docs/method.md 1.5): A is stored and moved as C codes, occupancy map and B; every load of A from the
  buffer rebuilds it with k shift-and-adds per non-zero coefficient (per entry without zero skipping).
Training step (batch = hw.batch): forward as inference; backward to activations with the same
weights, X the output gradients, Y the input gradients; backward to weights with A the stored
activations (moved at `stored_activation_bits`, read into the PEs at the activation width), X the output gradients, Y the weight gradient (SD: plus k MACs and k shift-and-adds per
non-zero to project dW onto C and B); update reads and writes weights and optimizer state and reads
the gradient, three MAC-priced operations per trainable value (momentum, decay, step).
Storage: inference = stored weights; training = weights, gradients and optimizer state of the
trainable values (SD: non-zeros of C and B) and the activations kept for the backward pass, at the
width they are stored (`stored_activation_bits`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.core.report import BASIS_BITS
from sd_jax.cost.hardware import Hardware
from sd_jax.cost.layers import Network

Array = jax.Array

ENERGY_MACS = "effective_macs"  # the `Layer` count the energy model charges (module docstring)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Counts:
    """Per-layer counts (L,), per example; `sd` is 1 where the layer is stored in SD form.

    `effective_macs` are the layers' MACs without taps on zero padding: what the model charges.
    """

    effective_macs: Array
    weights: Array
    inputs: Array
    outputs: Array
    sd: Array
    sd_storage_bits: Array  # reference count, B at 32 bits
    nonzeros: Array
    coeff_entries: Array
    basis_entries: Array
    k: Array


def layer_counts(network: Network, *, sd: bool = True) -> Counts:
    """Counts of `network`; `sd=False` gives the dense view (every layer stored dense)."""
    def column(value) -> Array:
        return jnp.asarray(np.array([value(layer) for layer in network.layers], np.float64), jnp.float32)

    use = lambda layer: sd and layer.sd is not None
    stat = lambda field: column(lambda layer: getattr(layer.sd, field) if use(layer) else 0)
    return Counts(
        effective_macs=column(lambda layer: getattr(layer, ENERGY_MACS)), weights=column(lambda layer: layer.weights),
        inputs=column(lambda layer: layer.inputs), outputs=column(lambda layer: layer.outputs),
        sd=column(lambda layer: float(use(layer))), sd_storage_bits=stat("storage_bits"),
        nonzeros=stat("nonzeros"), coeff_entries=stat("coeff_entries"), basis_entries=stat("basis_entries"),
        k=stat("k"),
    )


def _stored_weight_bits(c: Counts, hw: Hardware) -> Array:
    """Bits of each layer's weights as stored and moved: SD form (B at hw.basis_bits) or dense."""
    sd_bits = c.sd_storage_bits + c.basis_entries * (hw.basis_bits - BASIS_BITS)
    return jnp.where(c.sd > 0, sd_bits, c.weights * hw.weight_bits)


def _pass(hw: Hardware, macs, a_bits, a_elems, a_reg_bits, x_elems, x_bits, y_elems, y_bits, rebuild_per_load):
    """Energy parts of one matrix-product pass (see the module docstring)."""
    ws = 1.0 - hw.output_stationary
    fanout = lambda elems: jnp.maximum(1.0, macs / jnp.maximum(elems, 1.0) / hw.pe_count)
    a_loads = ws + (1.0 - ws) * fanout(a_elems)
    x_bits_total, y_bits_total = x_elems * x_bits, y_elems * y_bits
    a_tiles = jnp.maximum(1.0, jnp.ceil(a_bits / hw.buffer_bits))
    y_tiles = jnp.maximum(1.0, jnp.ceil(y_bits_total / hw.buffer_bits))
    dram = ws * (a_bits + x_bits_total * a_tiles) + (1.0 - ws) * (a_bits * y_tiles + x_bits_total) + y_bits_total
    psums = ws * 2.0 * y_elems * hw.accumulator_bits * fanout(y_elems) + (1.0 - ws) * y_bits_total
    buffer = a_bits * a_loads + x_bits_total * fanout(x_elems) + psums
    register = macs * (a_reg_bits + x_bits + 2.0 * hw.accumulator_bits)
    return dict(
        dram=dram * hw.dram_per_bit, buffer=buffer * hw.buffer_per_bit, register=register * hw.register_per_bit,
        mac=macs * hw.mac, rebuild=rebuild_per_load * a_loads * hw.add,
    )


@jax.jit
def energy(counts: Counts, hw: Hardware) -> dict[str, dict[str, Array]]:
    """Per-layer energies and storage for one description.

    Returns {"inference": parts per example, "training": {"forward", "backward_activations",
    "backward_weights", "update"} parts per step, "storage": {"weights", "gradients", "optimizer",
    "activations"} in bits per step}; each part is an (L,) array.
    """
    c, batch = counts, hw.batch
    macs, inputs, outputs = c.effective_macs * batch, c.inputs * batch, c.outputs * batch
    weight_bits = _stored_weight_bits(c, hw)
    coefficient_steps = jnp.where(hw.skip_zeros > 0, c.nonzeros, c.coeff_entries) * c.k * c.sd
    forward = _pass(hw, macs, weight_bits, c.weights, hw.weight_bits, inputs, hw.activation_bits,
                    outputs, hw.activation_bits, coefficient_steps)
    backward_activations = _pass(hw, macs, weight_bits, c.weights, hw.weight_bits, outputs, hw.gradient_bits,
                                 inputs, hw.gradient_bits, coefficient_steps)
    trainable = jnp.where(c.sd > 0, c.nonzeros + c.basis_entries, c.weights)
    backward_weights = _pass(hw, macs, inputs * hw.stored_activation_bits, inputs, hw.activation_bits, outputs,
                             hw.gradient_bits, trainable, hw.gradient_bits, 0.0)
    projection = c.nonzeros * c.k * c.sd  # dC = dW B^T on the mask (MACs), dB = C^T dW (shift-adds)
    backward_weights = dict(backward_weights, mac=backward_weights["mac"] + projection * hw.mac,
                            rebuild=projection * hw.add)
    update_bits = 2.0 * weight_bits + trainable * (hw.gradient_bits + 2.0 * hw.optimizer_bits)
    zero = jnp.zeros_like(macs)
    update = dict(dram=update_bits * hw.dram_per_bit, buffer=zero, register=zero,
                  mac=3.0 * trainable * hw.mac, rebuild=zero)
    return dict(
        inference={key: value / batch for key, value in forward.items()},
        training=dict(forward=forward, backward_activations=backward_activations,
                      backward_weights=backward_weights, update=update),
        storage=dict(weights=weight_bits, gradients=trainable * hw.gradient_bits,
                     optimizer=trainable * hw.optimizer_bits, activations=inputs * hw.stored_activation_bits),
    )


@jax.jit
def sweep_energy(counts: Counts, descriptions: Hardware) -> dict[str, dict[str, Array]]:
    """`energy` over stacked descriptions (leading axis n, see `hardware.stack`); every leaf gains it."""
    return jax.vmap(energy, in_axes=(None, 0))(counts, descriptions)


def total(parts: dict[str, Array]) -> Array:
    """Sum of energy parts over parts and layers (the last axis); keeps a sweep's leading axis."""
    return sum(jnp.sum(value, axis=-1) for value in parts.values())


def training_total(result: dict[str, dict]) -> Array:
    """Energy of one training step, all phases and layers."""
    return sum(total(parts) for parts in result["training"].values())
