import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sd_jax
from experiments import numpy_reference
from sd_jax.core import blocking, pow2


def _he(shape, seed=0):
    fan_in = int(np.prod(shape[:-1]))
    return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * np.sqrt(2.0 / fan_in)


def _assert_powers_of_two(coeff, low, high):
    values = np.asarray(coeff, np.float64)
    mantissa, _ = np.frexp(values)
    assert ((values == 0) | (np.abs(mantissa) == 0.5)).all()
    magnitudes = np.abs(values[values != 0])
    assert magnitudes.size and magnitudes.min() >= low and magnitudes.max() <= high


@pytest.mark.parametrize("shape, kind", [((3, 3, 32, 16), "conv"), ((100, 10), "dense"),
                                         ((1, 1, 64, 8), "conv"), ((3, 3, 1, 12), "depthwise")])
def test_coefficients_are_signed_powers_of_two_in_range(shape, kind):
    weight = _he(shape) * 50  # large weights exercise the clip at max_coeff
    result = sd_jax.decompose(weight, kind=kind, threshold=4e-3, max_coeff=8.0)
    _assert_powers_of_two(result.coeff, pow2.min_coeff(4e-3), 8.0)
    assert np.abs(np.asarray(result.coeff)).max() == 8.0
    np.testing.assert_array_equal(result.mask, np.asarray(result.coeff) != 0)
    assert result.reconstruct().shape == shape
    assert result.basis.shape == (result.spec.num_blocks, result.spec.k, result.spec.k)


@pytest.mark.parametrize("shape, kind", [((3, 3, 16, 8), "conv"), ((40, 7), "dense"), ((5, 5, 1, 4), "depthwise")])
def test_without_rounding_and_sparsity_reconstruction_is_exact(shape, kind):
    weight = _he(shape, seed=3)
    result = sd_jax.decompose(weight, kind=kind, threshold=0.0, pow2=False, iterations=5)
    error = np.linalg.norm(np.asarray(result.reconstruct()) - weight) / np.linalg.norm(weight)
    assert error <= 1e-5
    assert result.report.rel_error <= 1e-5


@pytest.mark.parametrize(
    "shape, kind, options",
    [((3, 3, 16, 4), "conv", dict(threshold=1e-3)),
     ((3, 3, 8, 4), "conv", dict(threshold=2e-2, row_threshold=0.1)),
     ((70, 5), "dense", dict(threshold=4e-3, max_coeff=4.0)),
     ((3, 3, 1, 6), "depthwise", dict(threshold=1e-3, iterations=7))],
)
def test_batched_decomposition_matches_numpy_per_block_loop(shape, kind, options):
    weight = _he(shape, seed=1)
    result = sd_jax.decompose(weight, kind=kind, **options)
    blocks = np.asarray(blocking.to_blocks(jnp.asarray(weight), result.spec))
    coeff, basis = numpy_reference.decompose_blocks(blocks, **options)
    np.testing.assert_array_equal(np.asarray(result.coeff), coeff)
    np.testing.assert_allclose(np.asarray(result.basis), basis, rtol=1e-4, atol=1e-5)


def test_structural_pruning_matches_numpy_with_the_same_row_pattern():
    weight = _he((3, 3, 8, 40), seed=2)
    result = sd_jax.decompose(weight, kind="conv", prune_fraction=0.25)
    spec = result.spec
    keep = np.asarray(result.coeff).any(axis=-1)  # (n, m)
    blocks = np.asarray(blocking.to_blocks(jnp.asarray(weight), spec))
    coeff = np.stack([
        numpy_reference.decompose_block(b, keep_rows=k.astype(np.float32))[0] for b, k in zip(blocks, keep)
    ])
    np.testing.assert_array_equal(np.asarray(result.coeff), coeff)


def test_structural_pruning_pattern_is_shared_by_groups_of_filters():
    cin, cout = 8, 70  # three groups of filters: 32, 32 and 6
    weight = _he((3, 3, cin, cout), seed=4)
    result = sd_jax.decompose(weight, kind="conv", threshold=0.0, prune_fraction=0.25, prune_group=32)
    rows = np.asarray(result.coeff).reshape(cout, -1, 3).any(axis=-1)  # kernel rows kept per filter
    real_rows = cin * 3
    for start in (0, 32, 64):
        group = rows[start:start + 32]
        assert (group == group[0]).all(), "filters of a group share one pattern"
        assert int((~group[0]).sum()) == int(0.25 * real_rows)
    # Pruned kernel rows are exactly zero in the rebuilt weight too.
    rebuilt = np.asarray(result.reconstruct())  # (kh, kw, cin, cout)
    per_filter_rows = np.transpose(rebuilt, (3, 2, 0, 1)).reshape(cout, -1, 3)
    np.testing.assert_array_equal(per_filter_rows[~rows], 0)
    # The removed rows are those with the smallest L1 norm summed over the group.
    l1 = np.abs(np.transpose(weight, (3, 2, 0, 1)).reshape(cout, -1, 3)).sum(-1)[:32].sum(0)
    assert l1[~rows[0]].max() <= l1[rows[0]].min()


def test_dense_pruning_removes_rows_of_row_length_inputs():
    weight = _he((60, 8), seed=5)
    result = sd_jax.decompose(weight, kind="dense", threshold=0.0, prune_fraction=0.5)
    rows = np.asarray(result.coeff).any(axis=-1)
    assert int((~rows).sum()) == 8 * 10
    rebuilt = np.asarray(result.reconstruct()).T.reshape(8, 20, 3)
    np.testing.assert_array_equal(rebuilt[~rows], 0)


def test_row_threshold_zeroes_weak_rows():
    weight = _he((3, 3, 16, 8), seed=6)
    threshold, row_threshold = 1e-3, 0.2
    result = sd_jax.decompose(weight, kind="conv", threshold=threshold, row_threshold=row_threshold)
    row_l1 = np.abs(np.asarray(result.coeff)).sum(-1)
    # A row survives only with L1 >= row_threshold before rounding, so >= 2/3 of it after.
    assert (row_l1[row_l1 > 0] >= row_threshold * 2 / 3).all()
    assert (row_l1 == 0).mean() > 0.2


def test_threshold_decay_keeps_rows_alive():
    weight = _he((3, 3, 16, 8), seed=7) * 0.05
    plain = sd_jax.decompose(weight, kind="conv", threshold=1e-2)
    decayed = sd_jax.decompose(weight, kind="conv", threshold=1e-2, decay_steps=4, threshold_decay=0.5)
    empty = lambda r: int((~np.asarray(r.coeff).any(-1)).sum())
    assert empty(decayed) < empty(plain)
    assert decayed.report.rel_error < plain.report.rel_error


def test_row_scale_represents_each_rows_largest_entry():
    weight = _he((3, 3, 16, 8), seed=8)
    result = sd_jax.decompose(weight, kind="conv", threshold=0.0, row_scale=True)
    assert result.row_scale.shape == result.spec.block_shape[:2] + (1,)
    scaled = np.asarray(result.coeff * result.row_scale)
    assert result.reconstruct().shape == weight.shape
    plain = sd_jax.decompose(weight, kind="conv", threshold=0.0)
    assert result.report.rel_error < plain.report.rel_error
    assert result.report.storage_bits > plain.report.storage_bits  # 32 bits per row scale
    assert np.isfinite(scaled).all()


def test_blocks_stop_early_and_iterations_bound_the_rounds():
    weight = _he((3, 3, 64, 16), seed=9)
    assert sd_jax.decompose(weight, kind="conv", iterations=1).report.rounds == 1
    result = sd_jax.decompose(weight, kind="conv", iterations=50)
    assert result.report.rounds <= 50


def test_all_zero_tensor_gives_zero_coefficients_and_no_nan():
    result = sd_jax.decompose(np.zeros((3, 3, 8, 4), np.float32), kind="conv")
    assert not np.asarray(result.coeff).any()
    assert np.isfinite(np.asarray(result.basis)).all()
    assert not np.asarray(result.reconstruct()).any()
    assert result.report.rel_error == 0.0 and result.report.density == 0.0


def test_report_counts_storage_as_the_reference():
    weight = _he((3, 3, 64, 8), seed=10)
    result = sd_jax.decompose(weight, kind="conv", threshold=4e-3)
    report, coeff = result.report, np.asarray(result.coeff)
    nonzero = coeff[coeff != 0]
    distinct = len(np.unique(np.abs(nonzero)))
    assert report.nonzeros == nonzero.size and report.distinct_exponents == distinct
    expected = nonzero.size * (int(np.ceil(np.log2(distinct))) + 1) + coeff.size + 32 * result.basis.size
    assert report.storage_bits == expected
    assert report.density == pytest.approx(nonzero.size / weight.size)
    rebuilt_error = np.linalg.norm(np.asarray(result.reconstruct()) - weight) / np.linalg.norm(weight)
    assert report.rel_error == pytest.approx(rebuilt_error, rel=1e-4)
    assert report.compression == pytest.approx(32 * weight.size / expected)


@pytest.mark.parametrize(
    "weight, kwargs, message",
    [(np.full((3, 3, 4, 4), np.nan, np.float32), dict(kind="conv"), "non-finite"),
     (np.ones((3, 3, 4), np.float32), dict(kind="conv"), "rank-4"),
     (np.ones((4, 4), np.float32), dict(kind="attention"), "unknown kind"),
     (np.ones((4, 4), np.float32), dict(kind="dense", threshold=-1.0), "threshold"),
     (np.ones((4, 4), np.float32), dict(kind="dense", max_coeff=30.0), "power of two"),
     (np.ones((4, 4), np.float32), dict(kind="dense", iterations=0), "iterations"),
     (np.ones((4, 4), np.float32), dict(kind="dense", prune_fraction=1.5), "prune_fraction"),
     (np.ones((4, 4), np.float32), dict(kind="dense", bogus=1), "unknown decomposition option"),
     (np.ones((4, 4), np.int32), dict(kind="dense"), "floating point")],
)
def test_bad_input_raises_value_error_naming_the_tensor(weight, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        sd_jax.decompose(weight, name="block3/conv2/kernel", **kwargs)
    assert "block3/conv2/kernel" in str(info.value)


def test_decomposition_is_a_pytree():
    result = sd_jax.decompose(_he((12, 4)), kind="dense")
    leaves = jax.tree.leaves(result)
    assert len(leaves) == 3  # basis, coeff, mask; row_scale is None
    doubled = jax.tree.map(lambda x: x * 2, result)
    np.testing.assert_allclose(doubled.basis, result.basis * 2)


def test_calls_padded_to_shared_sizes_reuse_one_compiled_program_and_give_the_same_results():
    from sd_jax.core import decompose as decompose_lib

    rng = np.random.default_rng(3)
    options = decompose_lib.DecomposeOptions(threshold=0.05, iterations=6)
    job = lambda name, shape: decompose_lib.TensorJob(name, rng.normal(size=shape).astype(np.float32), "conv",
                                                      options)
    small, large = [job("a", (3, 3, 8, 8))], [job("b", (3, 3, 8, 24)), job("c", (3, 3, 8, 40))]
    sizes = decompose_lib.compiled_sizes(large)
    assert all(blocks >= 1 and tensors >= 3 for blocks, tensors in sizes.values())
    decompose_lib.decompose_many(large, min_sizes=sizes)
    compiled = decompose_lib._decompose_bucket._cache_size()
    padded = decompose_lib.decompose_many(small, min_sizes=sizes)[0]
    assert decompose_lib._decompose_bucket._cache_size() == compiled
    alone = decompose_lib.decompose_many(small)[0]
    np.testing.assert_array_equal(padded.coeff, alone.coeff)
    np.testing.assert_allclose(padded.basis, alone.basis, rtol=1e-6, atol=1e-7)
    assert padded.report == alone.report
