"""Learning-rate schedules: the reference SmartDeal schedule, the step schedule of the authors'
inference-only code, and cosine (docs/method.md 1.4, 1.6)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def reference_schedule(
    base_lr: float,
    epochs: int,
    *,
    steps_per_epoch: int = 1,
    swa_start: int | None = None,
    swa_lr: float | None = None,
    final_fraction: float = 0.01,
) -> optax.Schedule:
    """The authors' schedule (`schedule` in SmartDeal-Training/main.py), set once per epoch.

    Epoch e (from 0) runs at base_lr * factor(t), t = e / swa_start with SWA (`swa_start` and
    `swa_lr` given), else e / epochs: factor 1 for t <= 0.5, linear down to r at t = 0.9, then r,
    with r = swa_lr / base_lr with SWA, else `final_fraction`. Step s (optax's count, from 0) belongs
    to epoch s // steps_per_epoch, so the rate is constant within an epoch as in the reference;
    steps_per_epoch=1 with `epochs` the number of steps gives the same curve step by step.
    """
    if epochs < 1 or steps_per_epoch < 1 or base_lr <= 0:
        raise ValueError(f"need epochs >= 1, steps_per_epoch >= 1 and base_lr > 0, got {epochs}, "
                         f"{steps_per_epoch} and {base_lr}")
    if (swa_start is None) != (swa_lr is None) or (swa_start is not None and (swa_start < 1 or swa_lr <= 0)):
        raise ValueError(f"swa_start={swa_start}, swa_lr={swa_lr}: pass both (swa_start >= 1, swa_lr > 0) "
                         "for SWA, or neither")
    span = epochs if swa_start is None else swa_start
    ratio = final_fraction if swa_lr is None else swa_lr / base_lr

    def schedule(step):
        t = (step // steps_per_epoch) / span
        factor = jnp.where(t <= 0.5, 1.0, jnp.where(t <= 0.9, 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4, ratio))
        return base_lr * factor

    return schedule


def step_schedule(base_lr: float, *, step_epochs: int, factor: float, steps_per_epoch: int = 1) -> optax.Schedule:
    """The authors' inference-only schedule (`adjust_learning_rate` in SmartDeal-Inference/main.py):
    epoch e (from 0) runs at base_lr * factor ** (e // step_epochs), set once per epoch (reference:
    lr 0.05 halved every 30 epochs). Step s (optax's count, from 0) belongs to epoch
    s // steps_per_epoch."""
    if base_lr <= 0 or step_epochs < 1 or factor <= 0 or steps_per_epoch < 1:
        raise ValueError(f"need base_lr > 0, step_epochs >= 1, factor > 0 and steps_per_epoch >= 1, got {base_lr}, "
                         f"{step_epochs}, {factor} and {steps_per_epoch}")

    def schedule(step):
        return base_lr * factor ** ((step // steps_per_epoch) // step_epochs)

    return schedule


def cosine_schedule(base_lr: float, total_steps: int, *, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero (optax)."""
    if total_steps < 1 or base_lr <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"bad cosine schedule: base_lr={base_lr}, total_steps={total_steps}, warmup={warmup_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, total_steps, 0.0)
