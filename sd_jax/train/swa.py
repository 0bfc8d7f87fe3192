"""Stochastic weight averaging for SD training (DESIGN.md 1.4), as an optax transformation.

`swa(start_step)` passes updates through unchanged and keeps a running average of the parameters it
is given (the parameters before each update, from `start_step` on). At the end, batch-norm statistics
are recomputed for the averaged weights (`recompute_batch_stats`) and the averaged coefficients,
which are no longer powers of two, are projected back to SD form (`project_coefficients`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sd_jax.core import pow2


class SWAState(NamedTuple):
    """Steps seen, number of parameter sets averaged, and their running mean."""

    count: jax.Array
    averaged: jax.Array
    average: Any


def swa(start_step: int, every: int = 1) -> optax.GradientTransformation:
    """Average the parameters every `every` steps from `start_step` on; updates pass through."""
    if start_step < 0 or every < 1:
        raise ValueError(f"swa needs start_step >= 0 and every >= 1, got {start_step} and {every}")

    def init_fn(params):
        return SWAState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("swa needs the parameters: call update(grads, state, params)")
        take = (state.count >= start_step) & ((state.count - start_step) % every == 0)
        weight = 1.0 / (state.averaged + 1).astype(jnp.float32)
        average = jax.tree.map(
            lambda mean, p: jnp.where(take, mean + (p - mean) * weight.astype(p.dtype), mean), state.average, params
        )
        return updates, SWAState(state.count + 1, state.averaged + take.astype(jnp.int32), average)

    return optax.GradientTransformation(init_fn, update_fn)


def project_coefficients(average: Any, mask: Any, *, threshold: float, max_coeff: float) -> Any:
    """Averaged coefficients back to SD form: powers of two (or 0) inside the mask, 0 outside."""
    return jax.tree.map(
        lambda c, m: jnp.where(m, pow2.quantize_pow2(c, threshold, max_coeff), 0.0), average, mask
    )


def recompute_batch_stats(
    apply_fn: Callable[..., Any], variables: dict[str, Any], batches: Iterable[Any], *, momentum: float = 0.9
) -> Any:
    """Exact mean over `batches` of the batch-norm statistics of the model at `variables`.

    `apply_fn(variables, batch)` must run the model in training mode with `mutable=["batch_stats"]`
    and return (output, {"batch_stats": ...}). Flax keeps an exponential average
    new = momentum * old + (1 - momentum) * batch, so each batch's own statistics are recovered as
    (new - momentum * old) / (1 - momentum) and averaged with equal weights, as SWA prescribes.
    """
    old = variables["batch_stats"]
    total, count = jax.tree.map(jnp.zeros_like, old), 0
    for batch in batches:
        _, updated = apply_fn(variables, batch)
        batch_stats = jax.tree.map(lambda new, o: (new - momentum * o) / (1 - momentum), updated["batch_stats"], old)
        total = jax.tree.map(jnp.add, total, batch_stats)
        count += 1
    if count == 0:
        raise ValueError("recompute_batch_stats got no batches; pass an iterator over training batches")
    return jax.tree.map(lambda t: t / count, total)
