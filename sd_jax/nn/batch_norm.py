"""Batch norm whose backward pass keeps its input at 4 or 8 bits, fused with the residual sum and ReLU
that follow it in a ResNet (`sd.stored_activation_bits`).

Storing a conv's input at low bits (`sd_jax.core.stored_activation`) saves nothing on its own: batch
norm's backward pass needs the conv's output, and ReLU's its mask, so both stay at full precision.
`StoredBatchNorm` keeps them as `bits`-bit codes and one bit per entry instead
(`stored_activation.batch_norm_with_stored_input`). Its variables, their initial values, the forward
pass and the running statistics are those of `flax.linen.BatchNorm` (feature axis last, biased batch
variance), so a checkpoint moves between the two unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.core import stored_activation

Array = jax.Array


class StoredBatchNorm(nn.Module):
    """`nn.BatchNorm(momentum, epsilon, dtype)` (variables `scale`, `bias`; `batch_stats` `mean`, `var`),
    then `+ residual` and ReLU (`relu`), with the backward pass keeping its input at `bits` bits."""

    bits: int
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x: Array, residual: Array | None = None, *, train: bool) -> Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        x = jnp.asarray(x, self.dtype)
        if not train:
            y = (x - running_mean.value) * (scale * jax.lax.rsqrt(running_var.value + self.epsilon)) + bias
            y = jnp.asarray(y if residual is None else y + residual, self.dtype)
            return nn.relu(y) if self.relu else y
        y, mean, var = stored_activation.batch_norm_with_stored_input(
            x, scale, bias, residual, bits=self.bits, epsilon=self.epsilon, relu=self.relu)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y
