"""Low-bit stored activations: a linear layer whose backward pass keeps its input at 4 or 8 bits.

Backprop with approximate activations (Chakrabarti and Moseley 2019): the forward pass is exact,
but the copy of the input kept for the backward pass is quantized. For a layer y = op(x, W) that
is linear in each argument (a convolution, a matrix product):

- dL/dx needs only W and dy, so it stays exact;
- dL/dW = op's kernel gradient at the dequantized input x̂, so its error is that of x̂.

Quantization: per channel (the last axis of x), affine over the channel's [min, max] across all
other axes, 2^bits - 1 steps of size s_c = (max_c - min_c) / (2^bits - 1), round to nearest, so
|x̂ - x| <= s_c / 2 on every entry. The codes are stored as uint8, two per byte at 4 bits. For a
dense layer, |dW[c, j] - dŴ[c, j]| <= s_c / 2 · sum over rows of |dy[:, j]|; for a convolution the
sum runs over the batch and the output positions (zero padding is added to x̂, so it is exact).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

STORED_BITS = (4, 8)


class StoredActivation(NamedTuple):
    """An activation as the backward pass keeps it: codes (rows, channels) uint8, packed two to a
    byte at 4 bits, and the per-channel grid (low, step), each (channels,) float32."""

    codes: Array
    low: Array
    step: Array


def check_bits(bits: Any, where: str = "stored_activation_bits") -> int:
    """`bits` if it is one of STORED_BITS, else ValueError naming the allowed values."""
    if isinstance(bits, bool) or bits not in STORED_BITS:
        raise ValueError(f"{where}={bits!r} is not one of {STORED_BITS}; pass 8 or 4, or 0 / None for exact "
                         "stored activations")
    return bits


def channel_grid(x: Array, bits: int) -> tuple[Array, Array]:
    """(low, step) of each channel (last axis): its minimum and the size of one of 2^bits - 1 steps up
    to its maximum (step 1 for a constant channel, whose codes are then all 0)."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    low, high = jnp.min(rows, axis=0), jnp.max(rows, axis=0)
    step = (high - low) / (2**bits - 1)
    return low, jnp.where(step > 0, step, 1.0)


def quantize(x: Array, bits: int) -> StoredActivation:
    """x (..., channels) as `bits`-bit codes on its per-channel grid."""
    low, step = channel_grid(x, bits)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    codes = jnp.clip(jnp.round((rows - low) / step), 0, 2**bits - 1).astype(jnp.uint8)
    if bits == 4:
        codes = jnp.pad(codes, ((0, codes.shape[0] % 2), (0, 0)))
        codes = codes[0::2] | (codes[1::2] << 4)  # (rows / 2, channels)
    return StoredActivation(codes, low, step)


def dequantize(stored: StoredActivation, bits: int, shape: tuple[int, ...], dtype: Any) -> Array:
    """The activation of `shape` and `dtype` that `stored` holds (x̂: within step / 2 of x)."""
    codes = stored.codes
    if bits == 4:
        codes = jnp.stack([codes & 15, codes >> 4], axis=1).reshape(-1, codes.shape[-1])
    rows = codes[: math.prod(shape[:-1])]  # without the padding row of an odd count at 4 bits
    return (rows.astype(jnp.float32) * stored.step + stored.low).reshape(shape).astype(dtype)


def _stored_before_use(x: Array, stored: StoredActivation) -> tuple[Array, StoredActivation]:
    """(x, stored) through a loop that runs no step but that neither JAX nor XLA can remove, so the
    codes are written out before the forward pass uses x, and x can be freed after that use.

    Without it XLA:CPU (which drops optimization barriers before fusing) fuses the quantization into
    the backward pass's use of x̂ and keeps x at full precision until then; with the codes alone in
    the loop its scheduler still quantizes late, keeping x as long.
    """
    # False for every input, NaN included (steps are > 0 or NaN), but neither folds it away.
    never = stored.step[0] < 0
    # A body that changes both, so that neither is loop-invariant (and hoisted out of the loop).
    change = lambda carry: (-carry[0], carry[1] ^ jnp.uint8(255))
    x, codes = jax.lax.while_loop(lambda carry: never, change, (x, stored.codes))
    return x, stored._replace(codes=codes)


def linear_with_stored_input(op: Callable[[Array, Array], Array], x: Array, kernel: Array, bits: int) -> Array:
    """op(x, kernel), exact; its backward pass keeps x at `bits` bits (module docstring).

    `op` must be linear in x and in `kernel` (a convolution, a matrix product): the input gradient
    is then op's, which needs only the kernel, and the kernel gradient is op's at the dequantized x.
    """
    check_bits(bits)
    shape, dtype = x.shape, x.dtype

    @jax.custom_vjp
    def apply(x: Array, kernel: Array) -> Array:
        return op(x, kernel)

    def forward(x: Array, kernel: Array) -> tuple[Array, tuple[StoredActivation, Array]]:
        x, stored = _stored_before_use(x, quantize(x, bits))
        return op(x, kernel), (stored, kernel)

    def backward(residuals: tuple[StoredActivation, Array], cotangent: Array) -> tuple[Array, Array]:
        # Linear in x: op's vjp at x̂ gives the exact input gradient and the kernel gradient at x̂.
        stored, kernel = residuals
        _, vjp = jax.vjp(op, dequantize(stored, bits, shape, dtype), kernel)
        return vjp(cotangent)

    apply.defvjp(forward, backward)
    return apply(x, kernel)


def with_stored_input(op: Callable[..., Array], bits: int) -> Callable[..., Array]:
    """`op(lhs, rhs, *args, **kwargs)` (lax.conv_general_dilated, lax.dot_general) with lhs stored at
    `bits` bits for the backward pass; fits Flax's `nn.Conv(conv_general_dilated=...)` and
    `nn.Dense(dot_general=...)`."""
    check_bits(bits)

    def stored_op(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
        return linear_with_stored_input(lambda x, kernel: op(x, kernel, *args, **kwargs), lhs, rhs, bits)

    return stored_op
