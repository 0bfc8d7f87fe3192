"""Tests for sd_jax/cost/pricing.py: inference energy as the cost of per-layer SD settings."""
import dataclasses

import flax.linen as nn
import pytest

from sd_jax.cost import layers
from sd_jax.cost.analysis import summary
from sd_jax.cost.comparison import COST_DEFAULTS, analysis_of
from sd_jax.cost.layers import SDStats
from sd_jax.cost.pricing import energy_pricing
from sd_jax.nn.allocate import CandidateStats

SHAPE = (1, 2, 2, 16)


class Tiny(nn.Module):
    """A conv and a dense layer of the shapes of tests/nn/test_allocate.py (whose compilations they share)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), name="conv")(x)
        return nn.Dense(10, name="dense")(x.reshape(x.shape[0], -1))


def test_the_prices_are_the_analyzers_energies():
    model = Tiny()
    network = layers.extract_layers(model, SHAPE, train=False)
    pricing = energy_pricing(network, COST_DEFAULTS)
    stats = SDStats(nonzeros=300, coeff_entries=2304, basis_entries=16 * 9 * 9 // 3, distinct_magnitudes=5, k=3)
    candidate = CandidateStats(300, 5, 2304, 16 * 9 * 9 // 3, 3, float(stats.storage_bits))
    sd_conv = dataclasses.replace(network, layers=(dataclasses.replace(network.layers[0], sd=stats),
                                                   *network.layers[1:]))
    analyzed = summary(analysis_of(sd_conv, "tiny", COST_DEFAULTS))
    sizes = {"conv": 2304}
    assert pricing.dense_total(sizes, 26) == pytest.approx(analyzed["dense_inference_energy"], rel=1e-5)
    total = pricing.fixed(sizes, 26) + pricing.costs("conv", [candidate])[0]
    assert total == pytest.approx(analyzed["sd_inference_energy"], rel=1e-5)


def test_a_layer_the_model_does_not_call_is_named():
    model = Tiny()
    pricing = energy_pricing(layers.extract_layers(model, SHAPE, train=False), COST_DEFAULTS)
    with pytest.raises(ValueError, match="'other' of the parameters is not called by the model"):
        pricing.fixed({"other": 10}, 0)
