"""Tests for sd_jax/nn/convert.py: a decomposed dense network runs as the same SD network."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.core.network import decompose_network
from sd_jax.nn import SD_COLLECTIONS, SDConv, SDDense, sd_variables


def _small_params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32)
    return {
        "stem/conv": {"kernel": normal(7, 7, 3, 4)},  # left dense by decompose_network's default
        "block/conv": {"kernel": normal(3, 3, 4, 6)},
        "block/bn": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
        "head/dense": {"kernel": normal(6, 5), "bias": jnp.zeros(5)},
    }


def test_decomposed_kernels_move_to_the_sd_collections():
    params = _small_params()
    result = decompose_network(params, threshold=1e-3)
    variables = sd_variables(result.tree)
    assert set(variables) == {"params", *SD_COLLECTIONS}
    assert set(variables["sd_coeff"]) == {"block/conv", "head/dense"}
    assert set(variables["params"]) == {"stem/conv", "block/bn", "head/dense"}
    assert set(variables["params"]["head/dense"]) == {"bias"}
    np.testing.assert_array_equal(variables["params"]["stem/conv"]["kernel"], params["stem/conv"]["kernel"])
    decomposition = result.tree["block/conv"]["kernel"]
    np.testing.assert_array_equal(variables["sd_basis"]["block/conv"]["basis"], decomposition.basis)
    np.testing.assert_array_equal(variables["sd_coeff"]["block/conv"]["coeff"], decomposition.coeff)
    np.testing.assert_array_equal(variables["sd_mask"]["block/conv"]["mask"], decomposition.mask)


def test_row_scaled_decomposition_raises_value_error():
    result = decompose_network(_small_params(), threshold=1e-3, row_scale=True)
    with pytest.raises(ValueError, match="row_scale=True, but SD layers store no row scale"):
        sd_variables(result.tree)


@pytest.mark.slow
def test_sd_resnet20_from_a_decomposition_computes_the_reconstructed_dense_network():
    # What you train is what you serve: the SD network on converted variables gives the logits of
    # the dense network whose kernels are the decomposition's C·B.
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    dense_model = models.get("resnet20", num_classes=10)
    dense = jax.jit(lambda key, x: dense_model.init(key, x, train=False))(jax.random.key(0), x)
    result = decompose_network(dense["params"], threshold=1e-3)
    sd_model = models.get("resnet20", num_classes=10, conv=functools.partial(SDConv, mode="pow2"),
                          dense=functools.partial(SDDense, mode="pow2"))
    variables = {**sd_variables(result.tree), "batch_stats": dense["batch_stats"]}
    sd_logits = jax.jit(lambda v, x: sd_model.apply(v, x, train=False))(variables, x)
    reconstructed = {**dense, "params": result.reconstruct()}
    dense_logits = jax.jit(lambda v, x: dense_model.apply(v, x, train=False))(reconstructed, x)
    np.testing.assert_allclose(sd_logits, dense_logits, rtol=1e-4, atol=1e-4)
