import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import models
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import path_name
from sd_jax.nn import convert
from sd_jax.nn.rules import SDRules
from sd_jax.train import projection


def _lenet():
    model = models.get("lenet5", num_classes=10)
    images = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    return model, images, model.init(jax.random.key(0), images, train=False)["params"]


def test_projection_replaces_each_kernel_by_power_of_two_coefficients_times_the_basis():
    model, images, params = _lenet()
    rules = SDRules([("^head/", {"skip": True})], threshold=1e-3, max_coeff=32.0, iterations=30)
    projected, decomposition = projection.project(params, rules)
    is_decomposition = lambda leaf: isinstance(leaf, Decomposition)
    leaves = jax.tree_util.tree_flatten_with_path(decomposition.tree, is_leaf=is_decomposition)[0]
    flat_projected = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(projected)[0]}
    flat_params = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    decomposed = []
    for path, leaf in leaves:
        name = path_name(path)
        if not is_decomposition(leaf):  # biases and the skipped classifier: untouched
            np.testing.assert_array_equal(flat_projected[name], flat_params[name])
            continue
        decomposed.append(name)
        coeff = np.asarray(leaf.coeff, np.float64)
        mantissa, _ = np.frexp(coeff)
        assert ((coeff == 0) | (np.abs(mantissa) == 0.5)).all() and np.abs(coeff).max() <= 32.0
        assert 0 < np.mean(coeff != 0) < 1  # threshold 1e-3 leaves C sparse
        np.testing.assert_array_equal(flat_projected[name], leaf.reconstruct())
        assert flat_projected[name].shape == flat_params[name].shape
        error = np.linalg.norm(flat_projected[name] - flat_params[name]) / np.linalg.norm(flat_params[name])
        assert 0 < error < 0.25  # random weights: about 0.15-0.18 (conv1: 5 x 5 with a 5 x 5 basis, near 0)
    assert "head/dense/kernel" not in decomposed and "features/conv1/kernel" in decomposed
    assert len(decomposed) == 4  # two convolutions, two hidden dense layers

    # What is projected is what an SD model holding that C and B serves.
    sd_model = models.get("lenet5", num_classes=10, sd=rules)
    sd_variables = convert.sd_variables(decomposition.tree)
    rebuilt = convert.dense_variables(sd_model, sd_variables, images, train=False)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), rebuilt, projected)
    np.testing.assert_allclose(sd_model.apply(sd_variables, images, train=False),
                               model.apply({"params": projected}, images, train=False), rtol=1e-4, atol=1e-5)
