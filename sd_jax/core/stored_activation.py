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


def _written_before_use(x: Array, codes: Any, never: Array) -> tuple[Array, Any]:
    """(x, codes: uint8 arrays) through a loop that runs no step (`never`: a False that nothing can fold) but that
    neither JAX nor XLA can remove, so `codes` are written out before the forward pass uses x, and x
    can be freed after that use.

    Without it XLA:CPU (which drops optimization barriers before fusing) fuses the quantization into
    the backward pass's use of x̂ and keeps x at full precision until then; with the codes alone in
    the loop its scheduler still quantizes late, keeping x as long.
    """
    # A body that changes both, so that neither is loop-invariant (and hoisted out of the loop).
    change = lambda carry: (-carry[0], jax.tree.map(lambda c: c ^ jnp.uint8(255), carry[1]))
    return jax.lax.while_loop(lambda carry: never, change, (x, codes))


def _stored_before_use(x: Array, stored: StoredActivation) -> tuple[Array, StoredActivation]:
    """(x, stored) with the codes written before x's use (`_written_before_use`)."""
    # False for every input, NaN included (steps are > 0 or NaN).
    x, codes = _written_before_use(x, stored.codes, stored.step[0] < 0)
    return x, stored._replace(codes=codes)


def _read_after(cotangent: Array, stored: StoredActivation) -> tuple[Array, StoredActivation]:
    """(cotangent, stored) with the codes read only once the cotangent exists (`_written_before_use`):
    else XLA may dequantize every layer's input at the start of the backward pass and hold them all."""
    cotangent, codes = _written_before_use(cotangent, stored.codes, stored.step[0] < 0)
    return cotangent, stored._replace(codes=codes)


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
        cotangent, stored = _read_after(cotangent, stored)
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


def pack_mask(mask: Array) -> Array:
    """A boolean array as bits, eight to a uint8 (`unpack_mask` gives it back)."""
    return jnp.packbits(mask.reshape(-1))


def unpack_mask(packed: Array, shape: tuple[int, ...]) -> Array:
    """The boolean array of `shape` that `pack_mask` packed."""
    return jnp.unpackbits(packed, count=math.prod(shape)).reshape(shape).astype(bool)


def batch_statistics(x: Array) -> tuple[Array, Array]:
    """(mean, biased variance) of x (..., channels) per channel, in float32, as flax's BatchNorm has them."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)


def batch_norm_with_stored_input(x: Array, scale: Array, bias: Array, residual: Array | None, *, bits: int,
                                 epsilon: float, relu: bool) -> tuple[Array, Array, Array]:
    """(y, mean, variance): batch norm of x (..., channels) with its batch statistics (`batch_statistics`,
    returned for running averages, no gradient through them), times `scale` plus `bias`, plus
    `residual` (if given), then ReLU (if `relu`). y is exact; its backward pass keeps x as `bits`-bit
    codes (`quantize`) and the ReLU mask as one bit per entry, so nothing of x stays at full precision
    for it.

    Gradients: with n = (x - mean) / sigma and dz = (dL/dy where the ReLU passed), dbias = sum dz,
    dscale = sum dz * n, dresidual = dz and dx = scale / sigma * (dz - mean(dz) - n * mean(dz * n)),
    with n taken at the dequantized x̂ (within step / 2 of x); mean and sigma are exact.
    """
    check_bits(bits)
    shape, dtype = x.shape, x.dtype
    axes = tuple(range(x.ndim - 1))
    residual_dtypes = () if residual is None else (residual.dtype,)
    # Computed once, outside the custom_vjp (whose formula holds their gradient) and without a gradient
    # of their own, which would keep x at full precision for the backward pass.
    mean, variance = batch_statistics(jax.lax.stop_gradient(x))
    inverse = jax.lax.rsqrt(variance + epsilon)

    def output(x: Array, mean: Array, inverse: Array, scale: Array, bias: Array, extra: tuple[Array, ...]) -> Array:
        y = (x.astype(jnp.float32) - mean) * inverse * scale + bias
        return (y + extra[0].astype(jnp.float32) if extra else y).astype(dtype)

    @jax.custom_vjp
    def apply(x: Array, mean: Array, inverse: Array, scale: Array, bias: Array, extra: tuple[Array, ...]) -> Array:
        y = output(x, mean, inverse, scale, bias, extra)
        return jax.nn.relu(y) if relu else y

    def forward(x, mean, inverse, scale, bias, extra):
        stored = quantize(x, bits)
        never = stored.step[0] < 0
        x, codes = _written_before_use(x, stored.codes, never)
        y = output(x, mean, inverse, scale, bias, extra)
        mask = None
        if relu:
            y, mask = _written_before_use(jax.nn.relu(y), pack_mask(y > 0), never)
        return y, (stored._replace(codes=codes), mask, mean, inverse, scale)

    def backward(residuals, cotangent):
        stored, mask, mean, inverse, scale = residuals
        cotangent, (codes, mask) = _written_before_use(cotangent, (stored.codes, mask), stored.step[0] < 0)
        stored = stored._replace(codes=codes)
        dz = cotangent.astype(jnp.float32)
        if mask is not None:
            dz = jnp.where(unpack_mask(mask, shape), dz, 0.0)
        normal = (dequantize(stored, bits, shape, jnp.float32) - mean) * inverse
        dbias, dscale = jnp.sum(dz, axes), jnp.sum(dz * normal, axes)
        dnormal = dz * scale
        dx = inverse * (dnormal - jnp.mean(dnormal, axes) - normal * jnp.mean(dnormal * normal, axes))
        no_gradient = jnp.zeros_like(mean)  # the statistics' gradient is in dx
        return (dx.astype(dtype), no_gradient, no_gradient, dscale, dbias,
                tuple(dz.astype(d) for d in residual_dtypes))

    apply.defvjp(forward, backward)
    return apply(x, mean, inverse, scale, bias, () if residual is None else (residual,)), mean, variance
