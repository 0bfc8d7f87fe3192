import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sd_jax.core import pow2


def _is_signed_power_of_two_or_zero(values: np.ndarray) -> np.ndarray:
    mantissa, _ = np.frexp(values.astype(np.float64))
    return (values == 0) | (np.abs(mantissa) == 0.5)


@pytest.mark.parametrize(
    "value, expected",
    [(0.0, 0.0), (1.0, 1.0), (0.75, 0.5), (0.76, 1.0), (1.5, 1.0), (1.51, 2.0), (3.0, 2.0),
     (6.0, 4.0), (6.1, 8.0), (-3.1, -4.0), (-0.375, -0.25), (2.0**-20, 2.0**-20)],
)
def test_round_pow2_nearest_in_linear_distance_ties_down(value, expected):
    assert float(pow2.round_pow2(jnp.float32(value))) == expected


@settings(deadline=None, max_examples=50)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=64),
       st.sampled_from([0.0, 1e-3, 4e-3, 0.1]), st.sampled_from([1.0, 8.0, 32.0]))
def test_quantize_gives_zero_or_signed_powers_within_range(values, threshold, max_coeff):
    x = jnp.asarray(values, jnp.float32)
    q = np.asarray(pow2.quantize_pow2(x, threshold, max_coeff))
    assert _is_signed_power_of_two_or_zero(q).all()
    nonzero = np.abs(q[q != 0])
    assert (nonzero <= max_coeff).all()
    if threshold > 0 and nonzero.size:
        assert nonzero.min() >= pow2.min_coeff(threshold)
    np.testing.assert_array_equal(q[np.abs(np.asarray(x)) < threshold], 0)
    # Rounding never moves a value further than to the neighbouring power of two.
    kept = (np.abs(np.asarray(x)) >= threshold) & (np.abs(np.asarray(x)) <= max_coeff) & (q != 0)
    ratio = q[kept] / np.asarray(x)[kept]
    assert ((ratio > 2 / 3 - 1e-6) & (ratio < 4 / 3 + 1e-6)).all()


def test_min_coeff_matches_reference_threshold():
    assert pow2.min_coeff(4e-3) == 2.0**-8
    assert pow2.min_coeff(1e-3) == 2.0**-10
    assert pow2.min_coeff(0.0) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_kept_under_jit_and_vmap(dtype):
    x = jax.random.normal(jax.random.key(0), (4, 16)).astype(dtype)
    q = jax.jit(jax.vmap(lambda row: pow2.quantize_pow2_ste(row, 1e-3, 32.0)))(x)
    assert q.dtype == dtype
    assert _is_signed_power_of_two_or_zero(np.asarray(q, np.float32)).all()


def test_ste_gradient_is_identity():
    x = jax.random.normal(jax.random.key(1), (32,))
    cotangent = jax.random.normal(jax.random.key(2), (32,))
    _, vjp = jax.vjp(lambda v: pow2.quantize_pow2_ste(v, 4e-3, 32.0), x)
    np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)
    grad = jax.grad(lambda v: jnp.sum(pow2.quantize_pow2_ste(v, 0.5, 2.0) * 3.0))(x)
    np.testing.assert_array_equal(grad, jnp.full_like(x, 3.0))


def test_is_power_of_two():
    assert pow2.is_power_of_two(32.0) and pow2.is_power_of_two(0.25)
    assert not any(pow2.is_power_of_two(v) for v in (0.0, -4.0, 30.0, float("inf"), float("nan")))


def test_exponents_of_powers():
    x = jnp.array([1.0, -0.25, 32.0, 2.0**-9])
    np.testing.assert_array_equal(pow2.exponents(x), [0, -2, 5, -9])


@pytest.mark.parametrize("threshold, expected", [(4e-3, 2.0**-7), (1e-3, 2.0**-9), (0.25, 0.25), (0.3, 0.5)])
def test_ceil_pow2_is_the_references_smallest_magnitude(threshold, expected):
    # SmartDeal-Training/main.py: min_C = the first 2^i >= threshold.
    assert pow2.ceil_pow2(threshold) == expected


def test_ceil_pow2_refuses_a_threshold_that_is_not_positive():
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        pow2.ceil_pow2(0.0)
