"""The compressibility loss of SD coefficients (Aytekin, Cricri, Aksu 2019, arXiv:1905.01044).

Aytekin et al. measure how compressible a tensor w is by ||w||_1 / ||w||_2: 1 for a single non-zero,
sqrt(n) for n entries of equal magnitude, and unchanged when w is scaled, so minimising it makes w
sparse without shrinking it. Here it acts on C inside its mask (docs/method.md 1.4), divided by
sqrt(n) with n the number of entries in the mask:

    compressibility(C, mask) = ||C ⊙ mask||_1 / (sqrt(n) · max(||C ⊙ mask||_2, EPSILON))

so a tensor's value lies in [1/sqrt(n), 1], and for d·n non-zeros of equal magnitude it is sqrt(d):
the square root of the density of C. Entries outside the mask (structurally pruned, or zero since
decomposition) neither count nor receive a gradient. A network's value is the mean over its SD
tensors, so the loss weight means the same for a small and a large model. The gradient of |c| at 0 is
taken as 0 (an entry at zero is not pushed anywhere), and the L2 norm is clamped at EPSILON
(`optax.safe_norm`), so an all-zero tensor has value 0 and a zero, finite gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

EPSILON = 1e-12  # the smallest L2 norm of C the ratio divides by


def compressibility(coeff: Array, mask: Array) -> Array:
    """||C ⊙ mask||_1 / (sqrt(n) ||C ⊙ mask||_2) of one coefficient tensor, n = entries in the mask; a scalar."""
    if coeff.shape != mask.shape:
        raise ValueError(f"coefficients of shape {coeff.shape} and mask of shape {mask.shape} differ; "
                         "pass C and the mask of the same SD layer")
    kept = jnp.where(mask, coeff, 0.0).astype(jnp.float32)
    l1 = jnp.sum(kept * jax.lax.stop_gradient(jnp.sign(kept)))  # d|c|/dc = sign(c), 0 at c = 0
    entries = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    return l1 / (jnp.sqrt(entries) * optax.safe_norm(kept, EPSILON))


def mean_compressibility(pairs: Sequence[tuple[Array, Array]]) -> Array:
    """The mean of `compressibility` over (coefficients, mask) pairs, one per SD tensor of a network."""
    if not pairs:
        raise ValueError("no SD coefficient tensors to measure; the compressibility loss needs a model with "
                         "SD layers (model.sd=True)")
    return jnp.mean(jnp.stack([compressibility(coeff, mask) for coeff, mask in pairs]))
