"""Decomposition at any weight scale: a true report, a scale-relative threshold, a warning when a
layer loses most of its energy, and a bounded number of compilations over many shapes."""

import warnings

import numpy as np
import pytest

import sd_jax
from sd_jax.core import blocking, decompose as decompose_module
from sd_jax.core.decompose import LossyDecompositionWarning


def _weight(shape, scale, seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _true_rel_error(result, weight):
    rebuilt = blocking.from_blocks(
        np.asarray(result.coeff, np.float64) * (1.0 if result.row_scale is None else np.asarray(result.row_scale))
        @ np.asarray(result.basis, np.float64), result.spec)
    weight = np.asarray(weight, np.float64)
    return np.linalg.norm(rebuilt - weight) / np.linalg.norm(weight)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-4, 1e19, 1e25, 1e30])
def test_report_error_is_the_true_error_at_every_scale(scale):
    weight = _weight((3, 3, 8, 4), scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyDecompositionWarning)
        result = sd_jax.decompose(weight, kind="conv")
    assert np.isfinite(np.asarray(result.basis)).all()
    assert result.report.rel_error == pytest.approx(_true_rel_error(result, weight), abs=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1e30])
def test_layer_threshold_scale_decomposes_weights_of_any_scale(scale):
    weight = _weight((3, 3, 8, 4), scale, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyDecompositionWarning)
        result = sd_jax.decompose(weight, kind="conv", threshold=1e-2, threshold_scale="layer")
    assert result.report.density > 0.5
    assert result.report.rel_error < 0.3
    assert result.report.rel_error == pytest.approx(_true_rel_error(result, weight), abs=1e-5)


def test_tiny_weights_with_an_absolute_threshold_warn_naming_the_layer():
    with pytest.warns(LossyDecompositionWarning, match=r"stage1/conv1.*threshold_scale='layer'"):
        result = sd_jax.decompose(_weight((3, 3, 8, 4), 1e-4), kind="conv", name="stage1/conv1")
    assert result.report.density == 0 and result.report.rel_error == pytest.approx(1.0)


def test_a_good_decomposition_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyDecompositionWarning)
        sd_jax.decompose(_weight((3, 3, 8, 4), 0.1), kind="conv")


def test_unknown_threshold_scale_is_refused():
    with pytest.raises(ValueError, match=r"conv: threshold_scale='block' is not one of \('absolute', 'layer'\)"):
        sd_jax.decompose(_weight((3, 3, 8, 4), 0.1), kind="conv", threshold_scale="block", name="conv")


def test_many_block_counts_compile_a_bounded_number_of_times():
    before = decompose_module._decompose_bucket._cache_size()
    for outputs in range(25, 65):  # 40 block counts of one (m, k) = (4, 3)
        sd_jax.decompose(_weight((12, outputs), 0.1, seed=outputs), kind="dense", iterations=3)
    assert decompose_module._decompose_bucket._cache_size() - before <= 12  # at most 8 padded sizes an octave
    assert [decompose_module.padded_size(n) for n in (1, 5, 16, 17, 37, 100, 1000)] == [1, 8, 16, 18, 40, 104, 1024]


def test_compiled_programs_are_dropped_past_the_limit(monkeypatch):
    """Each program holds hundreds of memory maps; without a limit a sweep over shapes ends in
    "LLVM compilation error: Cannot allocate memory" after about 175 programs."""
    monkeypatch.setattr(decompose_module, "MAX_COMPILED", 1)
    for rows in (1, 2):  # two (m, k): two programs
        result = sd_jax.decompose(_weight((3 * rows, 2), 0.1, seed=rows), kind="dense", iterations=1)
        assert decompose_module._decompose_bucket._cache_size() == 1
    assert result.report.rel_error < 1


def test_padded_blocks_give_the_unpadded_result():
    weight = _weight((12, 37), 0.1, seed=2)
    result = sd_jax.decompose(weight, kind="dense", threshold=4e-3)
    assert decompose_module.padded_size(result.spec.num_blocks) > result.spec.num_blocks  # padding blocks run
    blocks = blocking.to_blocks(weight, result.spec)
    per_block = lambda value: np.full(result.spec.num_blocks, value, np.float32)
    unpadded = decompose_module.decompose_blocks(
        blocks, np.ones(blocks.shape, bool), per_block(4e-3), per_block(32.0), per_block(0.0), per_block(0.5),
        iterations=30)
    np.testing.assert_array_equal(result.coeff, unpadded["coeff"])
    np.testing.assert_array_equal(result.basis, unpadded["basis"])


def test_a_rule_can_ask_for_a_layer_relative_threshold():
    from sd_jax.core.network import decompose_network
    from sd_jax.nn.rules import SDRules

    rules = SDRules([("^block/conv$", {"threshold_scale": "layer"})])
    params = {"block/conv": {"kernel": _weight((3, 3, 4, 8), 1e-5)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyDecompositionWarning)
        result = decompose_network(params, rules.planner())
    assert result.tree["block/conv"]["kernel"].options.threshold_scale == "layer"
    assert result.reports[0].density > 0.5
