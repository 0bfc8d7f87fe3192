import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core import fixed_point


def test_uniform_uses_per_sample_range_and_2_pow_bits_levels():
    x = jax.random.normal(jax.random.key(0), (3, 64)) * jnp.array([[1.0], [10.0], [0.1]])
    q = fixed_point.quantize_uniform(x, 4)
    for row, qrow in zip(np.asarray(x), np.asarray(q)):
        step = (row.max() - row.min()) / 15
        assert len(np.unique(qrow)) <= 16
        assert np.abs(qrow - row).max() <= step / 2 + 1e-6 * abs(row).max()
        assert qrow.min() == pytest.approx(row.min()) and qrow.max() == pytest.approx(row.max())


def test_uniform_with_running_range_clips():
    x = jnp.array([[-3.0, 0.0, 0.5, 3.0]])
    q = fixed_point.quantize_uniform(x, 8, low=-1.0, high=1.0)
    assert float(q.min()) == -1.0 and float(q.max()) == 1.0


def test_constant_sample_is_unchanged():
    x = jnp.full((2, 5), 0.3)
    np.testing.assert_array_equal(fixed_point.quantize_uniform(x, 8), x)


def test_activation_quantizer_has_straight_through_gradient():
    x = jax.random.normal(jax.random.key(1), (2, 8))
    low, high = fixed_point.per_sample_range(x)
    grad = jax.grad(lambda v: jnp.sum(fixed_point.quantize_activation(v, 8, low, high) * 2.0))(x)
    np.testing.assert_array_equal(grad, jnp.full_like(x, 2.0))


def test_gradient_quantizer_is_identity_forward_and_quantizes_backward():
    x = jax.random.normal(jax.random.key(2), (2, 50))
    weights = jax.random.normal(jax.random.key(3), (2, 50))
    loss = lambda v, key: jnp.sum(fixed_point.quantize_gradient(v, 3, key) * weights)
    key = jax.random.key(4)
    np.testing.assert_array_equal(fixed_point.quantize_gradient(x, 3, key), x)
    grad = jax.grad(loss)(x, key)
    for row in np.asarray(grad):
        assert len(np.unique(row)) <= 8


def test_stochastic_rounding_is_unbiased():
    x = jax.random.uniform(jax.random.key(5), (4, 100), minval=-2.0, maxval=2.0)
    keys = jax.random.split(jax.random.key(6), 4000)
    draws = jax.vmap(lambda k: fixed_point.quantize_uniform_stochastic(x, 2, k))(keys)
    step = float(jnp.max((x.max(1) - x.min(1)) / 3))
    mean_error = jnp.mean(draws, axis=0) - x
    # 4000 draws: standard error of the mean <= step / (2 sqrt(4000)) ~ 0.008 step.
    assert float(jnp.abs(mean_error).max()) < 0.05 * step
    assert abs(float(jnp.mean(mean_error))) < 0.005 * step
    single = draws[0]
    assert float(jnp.abs(single - x).max()) <= step + 1e-5


@pytest.mark.parametrize("bits", [0, 25, 2.5])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        fixed_point.quantize_uniform(jnp.ones((2, 2)), bits)
