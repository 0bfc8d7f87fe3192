"""Tests for sd_jax/nn/report.py: per-layer and total SD storage of a model."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core import blocking
from sd_jax.core.decompose import DecomposeOptions, Decomposition
from sd_jax.core.report import storage_bits
from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SDRules, model_report, sd_tree


def _decomposition(coeff, shape=(3, 3, 2, 1), kind="conv"):
    spec = blocking.block_spec(shape, kind)
    coeff = jnp.asarray(coeff, jnp.float32).reshape(spec.block_shape)
    return Decomposition(basis=jnp.ones((spec.num_blocks, spec.k, spec.k)), coeff=coeff, mask=coeff != 0,
                         row_scale=None, spec=spec, options=DecomposeOptions())


# One 6 x 3 block: 5 non-zeros with exponents {0, -1, -2, 3}, so 2 + 1 bits each.
COEFF = [1, -0.5, 0, 0.25, 0, 0, 0, 0, 8, 0, 0, 0, 0, -1, 0, 0, 0, 0]


def test_layer_figures_follow_the_reference_storage_count():
    report = model_report({"conv": {"kernel": _decomposition(COEFF), "bias": jnp.zeros(1)}})
    (layer,) = report.layers
    bits = 5 * 3 + 18 + 32 * 9
    assert bits == storage_bits(5, 4, 18, 9)
    assert (layer.name, layer.params, layer.nonzeros, layer.distinct_exponents) == ("conv", 18, 5, 4)
    assert (layer.min_exponent, layer.max_exponent, layer.storage_bits) == (-2, 3, bits)
    assert layer.density == pytest.approx(5 / 18)
    assert layer.compression(32) == pytest.approx(32 * 18 / bits)
    assert layer.compression(8) == pytest.approx(8 * 18 / bits)


def test_totals_count_kernels_left_dense_at_the_baseline_width():
    tree = {"a": {"kernel": _decomposition(COEFF)}, "stem": {"kernel": jnp.zeros((7, 7, 3, 2))}}
    total = model_report(tree).totals()
    bits = storage_bits(5, 4, 18, 9)
    assert total["dense_kernel_params"] == 294 and total["sd_params"] == 18
    assert total["compression_vs_32bit"] == pytest.approx(32 * 312 / (bits + 32 * 294))
    assert total["compression_vs_8bit"] == pytest.approx(8 * 312 / (bits + 8 * 294))


def test_table_and_json():
    report = model_report({"a": {"kernel": _decomposition(COEFF)}, "b": {"kernel": _decomposition(COEFF)}})
    table = report.table().splitlines()
    assert table[0].split()[:3] == ["layer", "kind", "shape"] and len(table) == 6
    assert table[2].startswith("a ") and table[-1].startswith("total")
    decoded = json.loads(report.to_json())
    assert [layer["name"] for layer in decoded["layers"]] == ["a", "b"]
    assert decoded["total"]["sd_storage_bits"] == 2 * storage_bits(5, 4, 18, 9)
    assert math.isclose(decoded["layers"][0]["compression_vs_32bit"], report.layers[0].compression(32))


def test_report_of_a_latent_sd_model_counts_the_quantized_coefficients():
    model = models.get("mlp", num_classes=5, hidden=(12,), sd=SDRules(threshold=0.1))
    x = jnp.zeros((1, 4, 4, 1))
    variables = synthetic_variables(model, x)
    variables["sd_coeff"]["head"]["dense"]["coeff"] *= 0.7  # no longer powers of two; the layer rounds them
    report = model_report(sd_tree(model, variables, x, train=False))
    assert [layer.name for layer in report.layers] == ["head/dense", "hidden1/dense"]  # sorted by name
    mask = np.asarray(variables["sd_mask"]["head"]["dense"]["mask"])
    assert report.layers[0].nonzeros == mask.sum()  # 0.7 * 2^e >= 2^-3 = min_coeff(0.1): none vanish


def test_coefficients_that_are_not_powers_of_two_raise_value_error_naming_the_layer():
    with pytest.raises(ValueError, match="layer 'conv': coefficients are not all 0 or signed powers of two"):
        model_report({"conv": {"kernel": _decomposition(np.full(18, 0.3))}})


def test_tree_without_decompositions_raises_value_error():
    with pytest.raises(ValueError, match="has no Decomposition kernel"):
        model_report({"conv": {"kernel": jnp.zeros((3, 3))}})
