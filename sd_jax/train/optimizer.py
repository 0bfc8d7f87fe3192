"""One optimizer over all trainable variable collections, each with its own rule (DESIGN.md 1.4, 2).

Trainable variables are a dict of collections: `params` (biases, batch-norm scales, dense layers)
and `sd_basis` (B) take SGD with momentum and weight decay; `sd_coeff` (C) takes the bucket-switch
update (`coeff_update="bucket_switch"`, C stays powers of two) or the same SGD on a latent float C
that the SD layers re-quantize with a straight-through estimator (`coeff_update="latent"`).
`sd_mask` is not trainable and must not be passed in.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from sd_jax.train.bucket_switch import bucket_switch

TRAINABLE = ("params", "sd_basis", "sd_coeff")
COEFF_UPDATES = ("bucket_switch", "latent")


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 5e-4) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as the reference (PyTorch) applies it."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def sd_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    coeff_update: str = "bucket_switch",
    switch_bar: int = 1,
    update_threshold: float = 0.0,
    threshold: float = 1e-3,
    max_coeff: float = 32.0,
    smallest: float | None = None,
    reset_every: int = 0,
) -> optax.GradientTransformation:
    """`optax.multi_transform` over the collections of a trainable-variables dict.

    `smallest` and `reset_every` go to `bucket_switch` (the revive magnitude and the counter reset)."""
    if coeff_update not in COEFF_UPDATES:
        raise ValueError(f"coeff_update={coeff_update!r}; pass one of {COEFF_UPDATES}")
    rules = {"sgd": sgd(learning_rate, momentum, weight_decay)}
    if coeff_update == "bucket_switch":
        rules["coeff"] = bucket_switch(
            learning_rate, momentum=momentum, weight_decay=weight_decay, switch_bar=switch_bar,
            update_threshold=update_threshold, threshold=threshold, max_coeff=max_coeff, smallest=smallest,
            reset_every=reset_every,
        )
    else:
        rules["coeff"] = sgd(learning_rate, momentum, weight_decay)

    def labels(variables: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(variables) - set(TRAINABLE))
        if unknown:
            raise ValueError(f"collections {unknown} are not trainable; pass only {TRAINABLE} (sd_mask is fixed)")
        return {name: jax.tree.map(lambda _: "coeff" if name == "sd_coeff" else "sgd", tree)
                for name, tree in variables.items()}

    return optax.multi_transform(rules, labels)
