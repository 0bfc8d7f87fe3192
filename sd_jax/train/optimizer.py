"""One optimizer over all trainable variable collections, each with its own rule (docs/method.md 1.4, 2).

Trainable variables are a dict of collections: `params` (biases, batch-norm scales, dense layers)
and `sd_basis` (B) take SGD with momentum and weight decay; `sd_coeff` (C) takes the bucket-switch
update (`coeff_update="bucket_switch"`, C stays powers of two) or the same SGD on a latent float C
that the SD layers re-quantize with a straight-through estimator (`coeff_update="latent"`), or that
SGD and then a snap to the quantized value (`coeff_update="quantize_each_step"`, the authors'
`--quant-each-step`). `sd_mask` is not trainable and must not be passed in. `optimizer="adam"` puts AdamW (weight decay
decoupled, `weight_decay` per unit of learning rate as optax counts it) where SGD stands, for models SGD
trains poorly (the Transformer); the bucket switch keeps its own momentum rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sd_jax.core import pow2
from sd_jax.core.decompose import DecomposeOptions
from sd_jax.train.bucket_switch import bucket_switch

TRAINABLE = ("params", "sd_basis", "sd_coeff")
COEFF_UPDATES = ("bucket_switch", "latent", "quantize_each_step")
OPTIMIZERS = ("sgd", "adam")


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 5e-4) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as the reference (PyTorch) applies it."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def quantize_each_step(inner: optax.GradientTransformation, *, threshold: float,
                       max_coeff: float) -> optax.GradientTransformation:
    """`inner`'s step on C, then C snapped to its quantized value q(C) (the authors'
    `--quant-each-step`): the stored C is a power of two or 0 after every step, while the momentum
    buffers of `inner` keep the float updates. q sparsifies below `pow2.min_coeff(threshold)`, as the
    latent SD layers do; the layers re-quantize in the forward pass, so float rounding of new - old
    is harmless."""
    smallest = pow2.min_coeff(threshold)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("quantize_each_step needs the coefficients: call update(grads, state, params)")
        updates, state = inner.update(updates, state, params)
        snapped = jax.tree.map(lambda c, u: pow2.quantize_pow2(c + u, smallest, max_coeff) - c, params, updates)
        return snapped, state

    return optax.GradientTransformation(inner.init, update_fn)


def sd_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    coeff_update: str = "bucket_switch",
    switch_bar: int = 1,
    update_threshold: float = 0.0,
    threshold: float = DecomposeOptions.threshold,
    max_coeff: float = DecomposeOptions.max_coeff,
    smallest: float | Callable[[str], float] | None = None,
    reset_every: int = 0,
    optimizer: str = "sgd",
) -> optax.GradientTransformation:
    """`optax.multi_transform` over the collections of a trainable-variables dict.

    `smallest` and `reset_every` go to `bucket_switch` (the revive magnitude and the counter reset)."""
    if coeff_update not in COEFF_UPDATES:
        raise ValueError(f"coeff_update={coeff_update!r}; pass one of {COEFF_UPDATES}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; pass one of {OPTIMIZERS}")

    def gradient_rule() -> optax.GradientTransformation:
        if optimizer == "adam":
            return optax.adamw(learning_rate, weight_decay=weight_decay)
        return sgd(learning_rate, momentum, weight_decay)

    rules = {"sgd": gradient_rule()}
    if coeff_update == "bucket_switch":
        rules["coeff"] = bucket_switch(
            learning_rate, momentum=momentum, weight_decay=weight_decay, switch_bar=switch_bar,
            update_threshold=update_threshold, threshold=threshold, max_coeff=max_coeff, smallest=smallest,
            reset_every=reset_every,
        )
    elif coeff_update == "latent":
        rules["coeff"] = gradient_rule()
    else:
        rules["coeff"] = quantize_each_step(gradient_rule(), threshold=threshold, max_coeff=max_coeff)

    def labels(variables: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(variables) - set(TRAINABLE))
        if unknown:
            raise ValueError(f"collections {unknown} are not trainable; pass only {TRAINABLE} (sd_mask is fixed)")
        return {name: jax.tree.map(lambda _: "coeff" if name == "sd_coeff" else "sgd", tree)
                for name, tree in variables.items()}

    return optax.multi_transform(rules, labels)
