"""Batched least squares for the tiny (m x k) systems of the SD decomposition, without LAPACK.

Modified Gram-Schmidt QR unrolled over the k columns (k is 3 for almost every block) runs as a few
fused elementwise passes over the batch, where a batched LAPACK call would loop over thousands of
3 x 3 problems. It also never squares the condition number, unlike the normal equations. Columns that
are zero or numerically dependent are dropped, so their unknowns come out exactly 0: for a zero
column this is the minimum-norm solution a pseudo-inverse gives, and nothing turns into NaN.

Matrices are passed column-major, (..., k, m): each of the k columns is contiguous over m, which is
what makes the reductions vectorize (about 3.7x faster on CPU than (..., m, k)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def lstsq(columns: Array, rhs: Array, rtol: float = 1e-6) -> Array:
    """X minimising ||M X - Y||, with M given as columns (..., k, m) and Y as rhs (..., p, m).

    Returns X of shape (..., k, p).
    """
    k = columns.shape[-2]
    cols = [columns[..., j, :] for j in range(k)]  # each (..., m)
    scale = jnp.sqrt(jnp.max(jnp.stack([jnp.sum(c * c, -1) for c in cols]), axis=0))
    tiny = jnp.finfo(columns.dtype).tiny
    q_columns, r = [], {}
    for j in range(k):
        v = cols[j]
        for i in range(j):
            r[i, j] = jnp.sum(q_columns[i] * v, -1)
            v = v - r[i, j][..., None] * q_columns[i]
        norm = jnp.sqrt(jnp.sum(v * v, -1))
        keep = norm > jnp.maximum(rtol * scale, tiny)
        r[j, j] = jnp.where(keep, norm, 1.0)
        q_columns.append(jnp.where(keep[..., None], v / r[j, j][..., None], 0.0))
    projected = [jnp.sum(q[..., None, :] * rhs, -1) for q in q_columns]  # rows of Q^T Y, each (..., p)
    solution = [None] * k
    for j in reversed(range(k)):
        row = projected[j]
        for i in range(j + 1, k):
            row = row - r[j, i][..., None] * solution[i]
        solution[j] = row / r[j, j][..., None]
    return jnp.stack(solution, axis=-2)
