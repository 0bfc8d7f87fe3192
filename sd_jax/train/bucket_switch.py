"""The bucket-switch update of SD coefficients as an optax transformation (docs/method.md 1.4).

It keeps every coefficient 0 or ±2^e inside its mask at every step. Per entry it computes the update
SGD with momentum and weight decay would make, optionally ignores updates with |update| <= a small
threshold, and adds sign(update) to an integer counter. When |counter| reaches `switch_bar` the entry
moves one exponent step: a non-zero entry doubles if the update pushes it away from zero and halves if
toward zero (falling to 0 below the smallest magnitude `min_coeff`); a zero entry inside the mask is
revived at ±min_coeff. Results are clipped to ±max_coeff and the counters that fired are reset.
With `reset_every=N` every counter also restarts at 0 each N steps (the reference resets them at the
start of every epoch, so votes never carry across epochs).

The mask is the non-zero pattern of C when the state is initialised (C straight from `decompose` or
from an SD layer's initialiser), unless one is passed. The updates it returns are new C - old C,
which are exact for powers of two, so `optax.apply_updates` lands exactly on the new values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sd_jax.core import pow2
from sd_jax.core.decompose import DecomposeOptions
from sd_jax.core.network import path_name


class BucketSwitchState(NamedTuple):
    """Step count; momentum buffers, switch counters (int32) and the fixed mask, each shaped like C."""

    count: jax.Array
    momentum: Any
    counters: Any
    mask: Any


def bucket_switch(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    switch_bar: int = 1,
    update_threshold: float = 0.0,
    threshold: float = DecomposeOptions.threshold,
    max_coeff: float = DecomposeOptions.max_coeff,
    smallest: float | Callable[[str], float] | None = None,
    reset_every: int = 0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Bucket-switch updates for power-of-two coefficients.

    threshold: the decomposition's sparsity threshold; the smallest magnitude is
        `pow2.min_coeff(threshold)`, where revived entries start and below which halved ones vanish.
    smallest: that magnitude given directly (the reference: `pow2.ceil_pow2(threshold)`), or a function
        from a coefficient's path in the updated tree ('sd_coeff/stage1/conv1/coeff') to its layer's, for
        layers decomposed with thresholds of their own.
    reset_every: steps between resets of all counters (the steps of an epoch in the reference); 0: never.
    mask: a pytree of booleans shaped like the coefficients; default: their non-zero pattern at init.
    """
    if not isinstance(switch_bar, int) or switch_bar < 1:
        raise ValueError(f"switch_bar={switch_bar!r} must be an integer >= 1 (reference: 1)")
    if not pow2.is_power_of_two(float(max_coeff)):
        raise ValueError(f"max_coeff={max_coeff!r} is not a power of two; pass e.g. 32.0")
    if not threshold > 0:
        raise ValueError(f"threshold={threshold!r} must be > 0: it sets where revived coefficients start")
    if momentum < 0 or weight_decay < 0 or update_threshold < 0:
        raise ValueError("momentum, weight_decay and update_threshold must be >= 0")
    if not isinstance(reset_every, int) or reset_every < 0:
        raise ValueError(f"reset_every={reset_every!r} must be an integer >= 0 (0: never reset the counters)")
    if smallest is None:
        smallest = pow2.min_coeff(threshold)
    smallest_at = smallest if callable(smallest) else (lambda _: smallest)

    def magnitude(path: tuple) -> float:
        name = path_name(path)
        value = smallest_at(name)
        if not pow2.is_power_of_two(float(value)):
            where = f" (of {name})" if name else ""
            raise ValueError(f"smallest={value!r}{where} is not a power of two; pass e.g. pow2.ceil_pow2(threshold)")
        return value

    if not callable(smallest):
        magnitude(())
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        chosen = jax.tree.map(lambda c: c != 0, params) if mask is None else mask
        return BucketSwitchState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(jnp.zeros_like, params),
            counters=jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.int32), params),
            mask=jax.tree.map(lambda m: jnp.asarray(m, bool), chosen),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("bucket_switch needs the current coefficients: call update(grads, state, params)")
        rate = schedule(state.count)
        fresh = (state.count % reset_every == 0) if reset_every else False

        def per_leaf(path, grad, c, buffer, counter, allowed):
            smallest = magnitude(path)
            counter = jnp.where(fresh, 0, counter)
            buffer = momentum * buffer + grad + weight_decay * c
            step = -rate * buffer  # what SGD with momentum and weight decay would add to C
            vote = jnp.where(jnp.abs(step) > update_threshold, jnp.sign(step), 0.0).astype(jnp.int32)
            counter = jnp.where(allowed, counter + vote, 0)
            fire = jnp.abs(counter) >= switch_bar
            direction = jnp.sign(counter).astype(c.dtype)
            away = direction * jnp.sign(c) > 0
            moved = jnp.where(c == 0, direction * smallest, jnp.where(away, c * 2, c / 2))
            moved = jnp.where(jnp.abs(moved) < smallest, 0.0, jnp.clip(moved, -max_coeff, max_coeff))
            new_c = jnp.where(fire & allowed, moved, c)
            return new_c - c, buffer, jnp.where(fire, 0, counter)

        results = jax.tree_util.tree_map_with_path(per_leaf, updates, params, state.momentum, state.counters,
                                                   state.mask)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, results)
        return pick(0), BucketSwitchState(state.count + 1, pick(1), pick(2), state.mask)

    return optax.GradientTransformation(init_fn, update_fn)
