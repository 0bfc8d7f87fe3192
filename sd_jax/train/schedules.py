"""Learning-rate schedules: the reference SmartDeal schedule and cosine (DESIGN.md 1.4)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def reference_schedule(
    base_lr: float, total_steps: int, *, final_fraction: float = 0.01, swa_lr: float | None = None
) -> optax.Schedule:
    """Constant `base_lr` for the first half, linear decay to base_lr * final_fraction (or to
    `swa_lr`) at 90 % of `total_steps`, then constant."""
    if total_steps < 1 or base_lr <= 0:
        raise ValueError(f"need total_steps >= 1 and base_lr > 0, got {total_steps} and {base_lr}")
    end = swa_lr if swa_lr is not None else base_lr * final_fraction
    start_decay, end_decay = 0.5 * total_steps, 0.9 * total_steps

    def schedule(step):
        progress = jnp.clip((step - start_decay) / (end_decay - start_decay), 0.0, 1.0)
        return base_lr + (end - base_lr) * progress

    return schedule


def cosine_schedule(base_lr: float, total_steps: int, *, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero (optax)."""
    if total_steps < 1 or base_lr <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"bad cosine schedule: base_lr={base_lr}, total_steps={total_steps}, warmup={warmup_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, total_steps, 0.0)
