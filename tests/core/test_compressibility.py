import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core.compressibility import compressibility, mean_compressibility


def _formula(coeff, mask):
    kept = np.where(mask, coeff, 0.0)
    return np.abs(kept).sum() / (np.sqrt(mask.sum()) * np.sqrt((kept**2).sum()))


def test_values_match_the_formula_and_their_mean_is_the_network_value():
    first = np.array([[0.5, -0.25, 0.0], [2.0, 0.125, -1.0]], np.float32)
    second = np.array([[[1.0, 1.0], [-1.0, 1.0]]], np.float32)
    first_mask = np.array([[True, True, False], [True, False, True]])
    second_mask = np.ones((1, 2, 2), bool)
    assert float(compressibility(first, first_mask)) == pytest.approx(_formula(first, first_mask), rel=1e-6)
    assert float(compressibility(second, second_mask)) == pytest.approx(1.0)  # equal magnitudes: sqrt(density 1)
    assert float(mean_compressibility([(first, first_mask), (second, second_mask)])) == pytest.approx(
        (_formula(first, first_mask) + 1.0) / 2, rel=1e-6)


def test_one_nonzero_gives_one_over_sqrt_n_at_any_scale():
    coeff = np.zeros((4, 4), np.float32)
    coeff[1, 2] = 3.0
    mask = np.ones((4, 4), bool)
    assert float(compressibility(coeff, mask)) == pytest.approx(0.25)
    assert float(compressibility(coeff * 1e-9, mask)) == pytest.approx(0.25)


def test_gradient_is_finite_and_zero_for_all_zero_and_masked_entries():
    grad = jax.jit(jax.grad(compressibility))
    zero = jnp.zeros((2, 3, 3))
    assert float(compressibility(zero, jnp.ones((2, 3, 3), bool))) == 0.0
    np.testing.assert_array_equal(grad(zero, jnp.ones((2, 3, 3), bool)), 0.0)
    np.testing.assert_array_equal(grad(jnp.ones((2, 3, 3)), jnp.zeros((2, 3, 3), bool)), 0.0)  # all pruned
    coeff = jax.random.normal(jax.random.key(0), (2, 3, 3))
    mask = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 3, 3))
    gradient = grad(coeff, mask)
    assert np.isfinite(gradient).all()
    np.testing.assert_array_equal(np.where(mask, 0.0, gradient), 0.0)


def test_mismatched_shapes_and_no_sd_tensor_are_refused():
    with pytest.raises(ValueError, match=r"coefficients of shape \(2, 3\) and mask of shape \(3, 2\) differ"):
        compressibility(jnp.ones((2, 3)), jnp.ones((3, 2), bool))
    with pytest.raises(ValueError, match="needs a model with SD layers"):
        mean_compressibility([])
