"""Operation counts and energy of integer-only SD inference (sd_jax.cost.integer)."""
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.cost import integer, tables
from sd_jax.cost.layers import Layer, Network, SDStats


def _dense_layer(sd: SDStats | None) -> Layer:
    """A 6 -> 2 dense layer (12 MACs); in SD form two blocks of 2 x 3 with 3 x 3 bases."""
    return Layer(name="head/dense", kind="dense", kernel_shape=(6, 2), input_shape=(6,), output_shape=(2,),
                 strides=(), dilation=(), groups=1, macs=12, effective_macs=12, sd_layer=sd is not None, sd=sd)


SMALL = Network(layers=(_dense_layer(SDStats(nonzeros=5, coeff_entries=12, basis_entries=18,
                                             distinct_magnitudes=2, k=3)), _dense_layer(None)),
                other_params=0)


def test_counts_of_a_small_layer_by_hand():
    ops = integer.integer_ops(SMALL)
    np.testing.assert_array_equal(ops.int8_macs, [12, 12])
    np.testing.assert_array_equal(ops.rebuild_shifts, [15, 0])  # 5 non-zeros of C, each shifts a row of 3
    np.testing.assert_array_equal(ops.rebuild_adds, [15, 0])
    np.testing.assert_array_equal(ops.weight_requantizations, [12, 0])  # every rebuilt entry back to int8
    np.testing.assert_array_equal(ops.output_requantizations, [2, 2])


def test_energy_of_a_small_layer_by_hand():
    parts = integer.integer_energy(integer.integer_ops(SMALL), "horowitz45nm")
    # Horowitz 45 nm (pJ): mult int8 0.2, add int32 0.1, mult int32 3.1.
    np.testing.assert_allclose(parts["mac"], [12 * 0.3, 12 * 0.3], rtol=1e-6)
    np.testing.assert_allclose(parts["rebuild"], [15 * 0.1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(parts["requantization"], [14 * 3.2, 2 * 3.2], rtol=1e-6)


def test_integer_inference_adds_data_movement_to_the_arithmetic():
    parts = integer.integer_inference_energy(SMALL)
    assert set(parts) == {"dram", "buffer", "register", "mac", "rebuild", "requantization"}
    assert float(jnp.sum(parts["dram"])) > 0


def test_a_table_without_integer_entries_is_refused():
    with pytest.raises(ValueError, match="no entry 'add_int32'"):
        integer.integer_energy(integer.integer_ops(SMALL), tables.get("eyeriss"))


def test_the_view_prices_what_the_table_covers_and_names_what_it_lacks():
    view = integer.integer_view(SMALL)
    assert view.missing == () and set(view.energy) == {"dram", "buffer", "register", "mac", "rebuild", "requantization"}
    np.testing.assert_allclose(view.energy["rebuild"], [15 * 0.1, 0.0], rtol=1e-6)
    eyeriss = integer.integer_view(SMALL, "eyeriss")
    assert eyeriss.energy is None and eyeriss.missing == ("mult_int8", "add_int8", "add_int32", "mult_int32")
    np.testing.assert_array_equal(eyeriss.ops.rebuild_adds, [15, 0])
