import jax
import numpy as np

from sd_jax.core.lstsq import lstsq


def _numpy_lstsq(columns, rhs):
    return np.stack([
        np.linalg.lstsq(c.T.astype(np.float64), r.T.astype(np.float64), rcond=None)[0]
        for c, r in zip(columns, rhs)
    ])


def test_matches_numpy_on_full_rank_systems():
    columns = np.asarray(jax.random.normal(jax.random.key(0), (50, 3, 40)))
    rhs = np.asarray(jax.random.normal(jax.random.key(1), (50, 3, 40)))
    np.testing.assert_allclose(lstsq(columns, rhs), _numpy_lstsq(columns, rhs), atol=1e-5)


def test_zero_column_gives_minimum_norm_solution():
    columns = np.array(jax.random.normal(jax.random.key(2), (20, 3, 10)))
    columns[:, 1] = 0
    rhs = np.asarray(jax.random.normal(jax.random.key(3), (20, 2, 10)))
    solution = np.asarray(lstsq(columns, rhs))
    np.testing.assert_array_equal(solution[:, 1], 0)
    np.testing.assert_allclose(solution, _numpy_lstsq(columns, rhs), atol=1e-5)


def test_degenerate_systems_stay_finite_and_fit():
    rhs = np.asarray(jax.random.normal(jax.random.key(4), (3, 3, 2)))
    zero = np.zeros((3, 3, 2), np.float32)
    np.testing.assert_array_equal(lstsq(zero, rhs), 0)
    dependent = np.asarray(jax.random.normal(jax.random.key(5), (3, 3, 2)))  # m = 2 < k = 3
    solution = np.asarray(lstsq(dependent, rhs))
    assert np.isfinite(solution).all()
    fitted = np.einsum("bkm,bkp->bpm", dependent, solution)
    np.testing.assert_allclose(fitted, rhs, atol=1e-4)
    np.testing.assert_allclose(solution, _numpy_lstsq(dependent, rhs), atol=1e-4)  # minimum norm


def test_collinear_columns_give_the_minimum_norm_solution():
    base = np.array(jax.random.normal(jax.random.key(6), (4, 3, 12)))
    base[:, 2] = 2.0 * base[:, 0]  # exactly dependent, as powers of two often are
    rhs = np.asarray(jax.random.normal(jax.random.key(7), (4, 3, 12)))
    np.testing.assert_allclose(lstsq(base, rhs), _numpy_lstsq(base, rhs), atol=1e-4)
