"""The SD decomposition as the authors' code runs it: a NumPy loop over blocks, one block at a time.

It is the speed baseline of `bench_decompose.py` and the independent oracle of
`tests/core/test_decompose.py`: per block, np.linalg.lstsq for both least-squares steps and an
early stop when the rounded C repeats (docs/method.md 1.3). Float32 throughout, like the reference.
"""

from __future__ import annotations

import numpy as np

from sd_jax.core.decompose import DecomposeOptions


def round_pow2(x: np.ndarray) -> np.ndarray:
    """Nearest power of two in linear distance, ties down, 0 stays 0."""
    mantissa, exponent = np.frexp(x)
    exponent = np.where(np.abs(mantissa) > 0.75, exponent, exponent - 1)
    return np.where(x == 0, 0, np.ldexp(np.sign(mantissa), exponent)).astype(x.dtype)


def decompose_block(
    a: np.ndarray,
    threshold: float = DecomposeOptions.threshold,
    max_coeff: float = DecomposeOptions.max_coeff,
    iterations: int = DecomposeOptions.iterations,
    row_threshold: float = 0.0,
    keep_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One (m, k) block -> (C (m, k), B (k, k), rounds run)."""
    a = np.asarray(a, np.float32)
    if keep_rows is not None:
        a = a * keep_rows[:, None]

    def sparsify(c):
        if keep_rows is not None:
            c = c * keep_rows[:, None]
        c = np.where(np.abs(c).sum(axis=1, keepdims=True) < row_threshold, 0, c)
        return np.where(np.abs(c) < threshold, 0, c).astype(np.float32)

    def quantize(c):
        return round_pow2(np.clip(c, -max_coeff, max_coeff))

    c, previous, rounds = sparsify(a), None, 0
    for _ in range(iterations):
        cq = quantize(c)
        if previous is not None and np.array_equal(cq, previous):
            break
        previous = cq
        basis = np.linalg.lstsq(cq, a, rcond=None)[0]
        c = sparsify(np.linalg.lstsq(basis.T, a.T, rcond=None)[0].T)
        rounds += 1
    cq = quantize(c)
    return cq, np.linalg.lstsq(cq, a, rcond=None)[0].astype(np.float32), rounds


def decompose_blocks(blocks: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
    """Loop `decompose_block` over blocks (n, m, k) -> (C (n, m, k), B (n, k, k))."""
    coeff = np.empty_like(blocks, dtype=np.float32)
    basis = np.empty((blocks.shape[0], blocks.shape[2], blocks.shape[2]), np.float32)
    for i, block in enumerate(blocks):
        coeff[i], basis[i], _ = decompose_block(block, **options)
    return coeff, basis
