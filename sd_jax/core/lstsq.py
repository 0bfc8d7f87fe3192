"""Batched least squares for the tiny systems of the SD decomposition, without LAPACK for k <= 3.

The normal equations are formed with one batched matmul per side and solved with a closed-form
(cofactor) inverse of the k x k Gram matrix. On the CPU this runs the whole ALS round about 2x faster
than an unrolled Gram-Schmidt QR and far faster than a batched LAPACK call on thousands of 3 x 3
systems (`experiments/bench_decompose.py` measures the latter). Matrices are passed column-major,
(..., k, m), so every reduction runs over contiguous memory.

Degenerate systems never produce NaN: the Gram matrix is normalised by its mean diagonal, columns
that are exactly or numerically zero are dropped (their unknowns are 0, which is the minimum-norm
solution a pseudo-inverse gives), and a relative ridge of 1e-7 keeps the rest invertible. Where
that leaves the system nearly singular (collinear power-of-two columns, fewer rows than columns),
float32 cofactors would be noise, so those systems take the pseudo-inverse from an eigen-
decomposition instead (minimum-norm least squares). That costs a LAPACK call, so it runs only when
the batch holds a singular system (`lax.cond`; under `vmap` both branches would run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

RIDGE = 1e-7
PINV_RCOND = 1e-5  # eigenvalues below this fraction of the largest count as zero
SINGULAR_DET = 1e-4  # determinant of the normalised Gram below which the system counts as singular
DEAD_COLUMN = 1e-12  # a column whose squared norm is below this fraction of the mean is dropped


def _cofactor_inverse(g: Array) -> tuple[Array, Array]:
    """Inverse and determinant of symmetric positive-definite (..., k, k); closed form for k <= 3."""
    k = g.shape[-1]
    if k == 1:
        det = jnp.maximum(g[..., 0, 0], RIDGE)
        return 1.0 / det[..., None, None], det
    if k == 2:
        a, b, d = g[..., 0, 0], g[..., 0, 1], g[..., 1, 1]
        det = jnp.maximum(a * d - b * b, RIDGE**2)
        adjugate = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-b, a], -1)], -2)
        return adjugate / det[..., None, None], det
    if k == 3:
        a, b, c = g[..., 0, 0], g[..., 0, 1], g[..., 0, 2]
        d, e, f = g[..., 1, 1], g[..., 1, 2], g[..., 2, 2]
        c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
        c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
        det = jnp.maximum(a * c00 + b * c01 + c * c02, RIDGE**3)
        rows = [jnp.stack(r, -1) for r in ((c00, c01, c02), (c01, c11, c12), (c02, c12, c22))]
        return jnp.stack(rows, -2) / det[..., None, None], det
    return jnp.linalg.inv(g), jnp.linalg.det(g)


def _pseudo_inverse(g: Array) -> Array:
    """Moore-Penrose inverse of symmetric positive semi-definite (..., k, k) matrices."""
    values, vectors = jnp.linalg.eigh(g)
    keep = values > PINV_RCOND * jnp.max(values, axis=-1, keepdims=True)
    inverse_values = jnp.where(keep, 1.0 / jnp.where(keep, values, 1.0), 0.0)
    return jnp.einsum("...ik,...k,...jk->...ij", vectors, inverse_values, vectors)


def solve_gram(gram: Array, cross: Array) -> Array:
    """X = gram^-1 cross for Gram matrices (..., k, k) of possibly rank-deficient systems."""
    k = gram.shape[-1]
    diagonal = jnp.diagonal(gram, axis1=-2, axis2=-1)
    scale = jnp.maximum(jnp.mean(diagonal, -1), jnp.finfo(gram.dtype).tiny)[..., None]
    live = diagonal > DEAD_COLUMN * scale  # (..., k)
    both_live = live[..., :, None] & live[..., None, :]
    eye = jnp.eye(k, dtype=gram.dtype)
    normalised = jnp.where(both_live, gram / scale[..., None], 0.0) + eye * jnp.where(live, 0.0, 1.0)[..., None, :]
    inverse, det = _cofactor_inverse(normalised + RIDGE * eye)
    singular = (det < SINGULAR_DET)[..., None, None]
    inverse = jax.lax.cond(
        jnp.any(singular), lambda: jnp.where(singular, _pseudo_inverse(normalised), inverse), lambda: inverse
    )
    solution = jnp.einsum("...ij,...jp->...ip", inverse, cross) / scale[..., None]
    return jnp.where(live[..., None], solution, 0.0)


def lstsq(columns: Array, rhs: Array) -> Array:
    """X minimising ||M X - Y||, with M given as its columns (..., k, m) and Y as rhs (..., p, m).

    Returns X of shape (..., k, p).
    """
    gram = jnp.einsum("...im,...jm->...ij", columns, columns)
    cross = jnp.einsum("...im,...pm->...ip", columns, rhs)
    return solve_gram(gram, cross)
