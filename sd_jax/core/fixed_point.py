"""Fixed-point quantizers for low-precision SD training (docs/method.md 1.4).

Activations: uniform N-bit quantization over a per-sample [min, max] range (a running range is passed
in at evaluation), straight-through gradient. Gradients: identity forward; the cotangent is quantized
to N bits with stochastic rounding on the way back, so its expectation is the exact cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 24:
        raise ValueError(f"bits={bits!r} is not an integer in [1, 24]; pass e.g. bits=8")


def per_sample_range(x: Array) -> tuple[Array, Array]:
    """Min and max of each sample (axis 0) over all other axes, shaped to broadcast against x."""
    axes = tuple(range(1, x.ndim))
    return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)


def _grid(x: Array, bits: int, low: Array, high: Array) -> tuple[Array, Array]:
    """Position of x on the 2^bits-level grid spanning [low, high], and the grid step."""
    levels = 2**bits - 1
    step = (high - low) / levels
    safe_step = jnp.where(step > 0, step, jnp.ones_like(step))
    return (jnp.clip(x, low, high) - low) / safe_step, safe_step


def quantize_uniform(x: Array, bits: int, low: Array | None = None, high: Array | None = None) -> Array:
    """Round x to the nearest of 2^bits evenly spaced levels on [low, high] (per sample by default).

    A constant sample (low == high) is returned unchanged.
    """
    _check_bits(bits)
    if low is None or high is None:
        low, high = per_sample_range(x)
    low = jnp.asarray(low, x.dtype)
    high = jnp.asarray(high, x.dtype)
    position, step = _grid(x, bits, low, high)
    quantized = jnp.round(position) * step + low
    return jnp.where(high > low, quantized, x).astype(x.dtype)


def stochastic_round(x: Array, key: Array) -> Array:
    """Round to floor(x) or floor(x) + 1 with probabilities that make the result unbiased."""
    noise = jax.random.uniform(key, x.shape, dtype=jnp.float32).astype(x.dtype)
    return jnp.floor(x + noise)


def quantize_uniform_stochastic(x: Array, bits: int, key: Array, per_sample: bool = True) -> Array:
    """N-bit uniform quantization with stochastic rounding; E[result] == x inside the range."""
    _check_bits(bits)
    if per_sample and x.ndim > 1:
        low, high = per_sample_range(x)
    else:
        low, high = jnp.min(x), jnp.max(x)
    position, step = _grid(x, bits, low, high)
    quantized = stochastic_round(position, key) * step + low
    return jnp.where(high > low, quantized, x).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_activation(x: Array, bits: int, low: Array, high: Array) -> Array:
    """`quantize_uniform` with a straight-through gradient for x (none for the range)."""
    return quantize_uniform(x, bits, low, high)


def _quantize_activation_fwd(x, bits, low, high):
    return quantize_uniform(x, bits, low, high), (low, high)


def _quantize_activation_bwd(bits, residuals, cotangent):
    # Straight-through: rounding is treated as the identity; the range gets no gradient.
    low, high = residuals
    del bits
    return cotangent, jnp.zeros_like(low), jnp.zeros_like(high)


quantize_activation.defvjp(_quantize_activation_fwd, _quantize_activation_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_gradient(x: Array, bits: int, key: Array) -> Array:
    """Identity forward; the backward pass quantizes the cotangent to `bits` with stochastic rounding.

    `key` must be fresh for every call (fold in the step and layer) so the rounding noise is
    independent across steps.
    """
    del bits, key
    return x


def _quantize_gradient_fwd(x, bits, key):
    return x, key


def _quantize_gradient_bwd(bits, key, cotangent):
    # Unbiased stochastic rounding keeps SGD's expected update while the cotangent moves as N bits.
    return quantize_uniform_stochastic(cotangent, bits, key), None


quantize_gradient.defvjp(_quantize_gradient_fwd, _quantize_gradient_bwd)
