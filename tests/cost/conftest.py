"""Fixtures of the cost tests."""
import dataclasses

import pytest

from sd_jax import models
from sd_jax.cost.layers import SDStats, extract_layers


@pytest.fixture(scope="module")
def network():
    """ResNet-20 with synthetic SD statistics on every layer: a quarter of C non-zero, k = 3."""
    net = extract_layers(models.get("resnet20", num_classes=10), (1, 32, 32, 3), train=False)
    stats = lambda layer: SDStats(layer.weights // 4, layer.weights, layer.weights // 9 * 3, 6, 3)
    return dataclasses.replace(net, layers=tuple(dataclasses.replace(l, sd=stats(l)) for l in net.layers))
