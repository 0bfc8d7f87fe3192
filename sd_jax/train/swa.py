"""Stochastic weight averaging for SD training (docs/method.md 1.4, 1.6), as an optax transformation.

`swa(first_step, every)` passes updates through unchanged and keeps a running average of the
parameters the updates lead to, taken after step `first_step` and every `every` steps after it (the
reference: after each epoch from its start epoch on). To use the average, the averaged coefficients,
which are no longer powers of two, are projected back to SD form (`project_coefficients`) and the
batch-norm statistics recomputed for the averaged weights (`recompute_batch_stats`).
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


def swa(first_step: int, every: int = 1) -> optax.GradientTransformation:
    """Average the parameters after step `first_step` (counted from 1) and after every `every` steps
    from there on; updates pass through. Put it last in a chain: it averages params + updates."""
    if first_step < 1 or every < 1:
        raise ValueError(f"swa needs first_step >= 1 and every >= 1, got {first_step} and {every}")

    def init_fn(params):
        return SWAState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("swa needs the parameters: call update(grads, state, params)")
        done = state.count + 1  # steps done once this update is applied
        take = (done >= first_step) & ((done - first_step) % every == 0)
        weight = 1.0 / (state.averaged + 1).astype(jnp.float32)
        new = optax.apply_updates(params, updates)  # exactly the parameters the train step produces
        average = jax.tree.map(
            lambda mean, p: jnp.where(take, mean + (p - mean) * weight.astype(p.dtype), mean), state.average, new
        )
        return updates, SWAState(done, state.averaged + take.astype(jnp.int32), average)

    return optax.GradientTransformation(init_fn, update_fn)


def find_state(opt_state: Any) -> SWAState:
    """The one `SWAState` inside an optimizer state (found by type, wherever the chain put it)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SWAState)) if isinstance(s, SWAState)]
    if len(found) != 1:
        raise ValueError(f"the optimizer state holds {len(found)} SWA states; chain exactly one swa() transformation")
    return found[0]


def project_coefficients(average: Any, mask: Any, *, smallest: float, max_coeff: float) -> Any:
    """Averaged coefficients back to SD form: 0 outside the mask; inside, 0 below `smallest` (the run's
    smallest magnitude, the one its bucket switch keeps, e.g. `pow2.min_coeff(threshold)`), else the
    nearest power of two, clipped to ±max_coeff."""
    if not (smallest == 0 or pow2.is_power_of_two(float(smallest))):
        raise ValueError(f"smallest={smallest!r} is not 0 or a power of two; pass the resolved magnitude, "
                         "e.g. pow2.min_coeff(threshold)")
    return jax.tree.map(lambda c, m: jnp.where(m, pow2.quantize_pow2(c, smallest, max_coeff), 0.0), average, mask)


def recompute_batch_stats(
    apply_fn: Callable[..., Any], variables: dict[str, Any], batches: Iterable[Any], *, momentum: float
) -> Any:
    """Mean over `batches`, with equal weights, of the batch-norm statistics of the model at `variables`
    (the reference's `bn_update` over an epoch of training batches).

    `apply_fn(variables, batch)` must run the model in training mode with `mutable=["batch_stats"]`
    and return (output, {"batch_stats": ...}). Flax keeps new = momentum * old + (1 - momentum) * batch,
    so each batch runs from zero statistics and its own are new / (1 - momentum); `momentum` is that
    of the model's batch norm.
    """
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    start = {**variables, "batch_stats": zeros}
    total, count = zeros, 0
    for batch in batches:
        _, updated = apply_fn(start, batch)
        total = jax.tree.map(jnp.add, total, updated["batch_stats"])
        count += 1
    if count == 0:
        raise ValueError("recompute_batch_stats got no batches; pass an iterator over training batches")
    return jax.tree.map(lambda t: t / ((1 - momentum) * count), total)
