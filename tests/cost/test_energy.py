"""Tests for sd_jax/cost/energy.py: counts to energy, sweeps."""
import dataclasses

import jax
import numpy as np
import pytest

from sd_jax.cost import energy, hardware


def test_dram_weight_traffic_by_hand(network):
    counts = energy.layer_counts(network, sd=False)
    hw = hardware.hardware(weight_bits=8, activation_bits=8, buffer_kib=1e6)  # everything fits: one tile
    layer = network.layers[1]
    expected_bits = layer.weights * 8 + layer.inputs * 8 + layer.outputs * 8
    dram = energy.energy(counts, hw)["inference"]["dram"][1]
    assert float(dram) == pytest.approx(expected_bits * 640 / 32, rel=1e-6)


def test_energy_charges_the_macs_without_padding_taps(network):
    hw = hardware.hardware()
    mac = energy.energy(energy.layer_counts(network, sd=False), hw)["inference"]["mac"]
    np.testing.assert_allclose(mac, [layer.effective_macs * float(hw.mac) for layer in network.layers], rtol=1e-6)
    assert network.layers[0].macs > network.layers[0].effective_macs  # the stem's 3x3 taps on the zero border


def test_sd_moves_fewer_weight_bits_and_pays_rebuild(network):
    hw = hardware.hardware()  # 32-bit dense weights
    sd = energy.energy(energy.layer_counts(network), hw)
    dense = energy.energy(energy.layer_counts(network, sd=False), hw)
    assert np.all(sd["storage"]["weights"] < dense["storage"]["weights"])
    assert float(sd["inference"]["rebuild"].sum()) > 0 and float(dense["inference"]["rebuild"].sum()) == 0
    layer = network.layers[1]
    assert float(sd["inference"]["rebuild"][1]) == pytest.approx(layer.sd.nonzeros * 3 * float(hw.add), rel=1e-6)
    no_skip = energy.energy(energy.layer_counts(network), dataclasses.replace(hw, skip_zeros=np.float32(0)))
    assert float(no_skip["inference"]["rebuild"][1]) == pytest.approx(layer.weights * 3 * float(hw.add), rel=1e-6)


def test_sd_that_stores_and_trains_what_dense_does_costs_what_dense_does(network):
    """At one bit width the SD view differs from the dense one only through its stored weights (bits
    moved, values trained) and its rebuild: make those equal and every part of every phase is equal."""
    hw = hardware.hardware(weight_bits=8, activation_bits=8, gradient_bits=8, batch=16)
    dense_counts = energy.layer_counts(network, sd=False)
    ones, zeros = np.ones_like(dense_counts.weights), np.zeros_like(dense_counts.weights)
    like_dense = dataclasses.replace(energy.layer_counts(network), sd=ones, sd_storage_bits=dense_counts.weights * 8,
                                     nonzeros=zeros, basis_entries=dense_counts.weights)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 energy.energy(like_dense, hw), energy.energy(dense_counts, hw))


def test_stored_activations_count_at_the_bits_stored(network):
    """With activations kept for the backward pass at 4 bits, their storage is 4/32 of the 32-bit one,
    and the weight-gradient pass moves fewer bits; the forward pass does not change."""
    counts = energy.layer_counts(network, sd=False)
    exact = energy.energy(counts, hardware.hardware(batch=16))
    stored = energy.energy(counts, hardware.hardware(batch=16, stored_activation_bits=4))
    np.testing.assert_allclose(stored["storage"]["activations"], exact["storage"]["activations"] * 4 / 32, rtol=1e-6)
    np.testing.assert_allclose(stored["storage"]["activations"],
                               [layer.inputs * 16 * 4 for layer in network.layers], rtol=1e-6)
    assert np.all(stored["training"]["backward_weights"]["dram"] < exact["training"]["backward_weights"]["dram"])
    jax.tree.map(np.testing.assert_array_equal, stored["training"]["forward"], exact["training"]["forward"])


def test_training_has_every_phase_and_more_energy_than_inference(network):
    hw = hardware.hardware(batch=4)
    result = energy.energy(energy.layer_counts(network, sd=False), hw)
    assert set(result["training"]) == {"forward", "backward_activations", "backward_weights", "update"}
    assert float(energy.training_total(result)) > 3 * 4 * float(energy.total(result["inference"]))


def test_dataflows_differ(network):
    counts = energy.layer_counts(network, sd=False)
    ws = energy.energy(counts, hardware.hardware(buffer_kib=1.0))
    os_ = energy.energy(counts, hardware.hardware(buffer_kib=1.0, dataflow="output_stationary"))
    assert float(energy.total(ws["inference"])) != float(energy.total(os_["inference"]))


def test_sweep_of_1000_equals_1000_single_calls(network):
    counts = energy.layer_counts(network)
    rng = np.random.default_rng(0)
    base = hardware.hardware(weight_bits=8, activation_bits=8)
    swept = hardware.sweep(base, buffer_bits=rng.uniform(1e3, 1e7, 1000), dram_per_bit=rng.uniform(1, 40, 1000),
                           output_stationary=rng.integers(0, 2, 1000), skip_zeros=rng.integers(0, 2, 1000),
                           batch=rng.integers(1, 64, 1000))
    together = jax.device_get(energy.sweep_energy(counts, swept))
    for i in range(1000):
        one = jax.device_get(energy.energy(counts, jax.tree.map(lambda leaf: leaf[i], swept)))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-6), together, one)
