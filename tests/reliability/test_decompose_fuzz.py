"""Hypothesis fuzz of `sd_jax.decompose` over kinds, shapes, input dtypes, options and scales 1e-30..1e30.

Every case checks: no NaN or inf in C, B or the report; every coefficient is 0 or +-2^e with
|C| <= max_coeff and the mask is exactly C's non-zero pattern; the reported relative error equals the
true one (C·B rebuilt in float64 against the float32 weight) and is at most 1. The fast set runs
`FAST_CASES` cases on shapes that share one compilation, the slow set `SLOW_CASES` on any shape.
"""

import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import sd_jax
from sd_jax.core import blocking
from sd_jax.core.decompose import LossyDecompositionWarning

FAST_CASES = 500
SLOW_CASES = 10_000
# Input dtypes and the decimal exponents of weight scale they represent without overflow.
DTYPES = {"float32": (-30, 30), "bfloat16": (-30, 30), "float16": (-3, 2)}


@st.composite
def cases(draw, outputs, conv_inputs, dense_inputs):
    """(kind, weight, options); the fast set draws shapes that share one compilation."""
    kind = draw(st.sampled_from(["conv", "dense", "depthwise"]))
    outputs = draw(outputs)
    shape = {"conv": (3, 3, draw(conv_inputs), outputs),
             "dense": (draw(dense_inputs), outputs),
             "depthwise": (3, 3, 1, outputs)}[kind]
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    exponent = draw(st.floats(*DTYPES[dtype]))
    options = dict(threshold=draw(st.sampled_from([0.0, 1e-3, 4e-3, 0.05])),
                   max_coeff=draw(st.sampled_from([8.0, 32.0])),
                   threshold_scale=draw(st.sampled_from(["absolute", "layer"])))
    seed = draw(st.integers(0, 2**32 - 1))
    weight = np.random.default_rng(seed).standard_t(draw(st.sampled_from([3, 30])), size=shape) * 10.0**exponent
    return kind, weight.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype), options


def _check(kind, weight, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyDecompositionWarning)
        result = sd_jax.decompose(weight, kind=kind, **options)
    coeff, basis = np.asarray(result.coeff, np.float64), np.asarray(result.basis, np.float64)
    assert np.isfinite(coeff).all() and np.isfinite(basis).all() and np.isfinite(result.report.rel_error)
    mantissa, _ = np.frexp(coeff)
    assert ((coeff == 0) | (np.abs(mantissa) == 0.5)).all(), "a coefficient is not 0 or +-2^e"
    assert np.abs(coeff).max(initial=0) <= options["max_coeff"]
    np.testing.assert_array_equal(result.mask, coeff != 0)
    target = np.asarray(weight, np.float32).astype(np.float64)
    true_error = np.linalg.norm(blocking.from_blocks(coeff @ basis, result.spec) - target) / np.linalg.norm(target)
    assert result.report.rel_error == pytest.approx(true_error, abs=1e-4)
    assert true_error <= 1 + 1e-5


@settings(max_examples=FAST_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(st.integers(5, 8), st.just(1), st.integers(7, 9)))  # every kind: 8 blocks of (3, 3)
def test_decompose_fuzz(case):
    _check(*case)


@pytest.mark.slow
@settings(max_examples=SLOW_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(st.integers(1, 40), st.integers(1, 8), st.integers(1, 40)))
def test_decompose_fuzz_slow(case):
    _check(*case)
