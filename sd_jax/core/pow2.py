"""Power-of-two quantization of SD coefficients (docs/method.md 1.2).

A coefficient is 0 or ±2^e. `quantize_pow2` zeroes magnitudes below `threshold`, clips to
`max_coeff` and rounds the rest to the nearest power of two in linear distance (between 2^(e-1) and
2^e the closer one wins; an exact tie goes down). All functions keep the input dtype and work under
`jit`, `vmap` and `grad`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _round_pow2_float32(x: Array) -> Array:
    """Nearest power of two of float32 values by bit arithmetic (about 3x faster than frexp/ldexp).

    x = 1.f * 2^E rounds up to 2^(E+1) exactly when the fraction f exceeds 1/2 (ties go down):
    clear the 23 fraction bits and carry one into the exponent field when the top one is set and
    any bit below it is too. NaN stays NaN; subnormals flush to zero, as XLA flushes them on CPU
    and GPU in any arithmetic anyway.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    round_up = (bits & jnp.uint32(0x007FFFFF)) > jnp.uint32(0x00400000)
    bits = (bits & jnp.uint32(0xFF800000)) + jnp.where(round_up, jnp.uint32(0x00800000), jnp.uint32(0))
    rounded = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(jnp.isnan(x), x, jnp.where(jnp.abs(x) < jnp.finfo(jnp.float32).tiny, 0.0 * x, rounded))


def round_pow2(x: Array) -> Array:
    """Round each entry to ±(nearest power of two) in linear distance; ties go down, 0 stays 0."""
    if x.dtype == jnp.float64:
        mantissa, exponent = jnp.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
        exponent = jnp.where(jnp.abs(mantissa) > 0.75, exponent, exponent - 1)
        return jnp.where(x == 0, x, jnp.ldexp(jnp.sign(mantissa), exponent))
    # float32, and bfloat16 / float16 through float32: a power of two in range converts back exactly.
    return _round_pow2_float32(x.astype(jnp.float32)).astype(x.dtype)


def quantize_pow2(x: Array, threshold: float | Array = 0.0, max_coeff: float | Array = 32.0) -> Array:
    """Sparsify (|x| < threshold -> 0), clip to ±max_coeff, round to the nearest power of two.

    `threshold` and `max_coeff` may be scalars or arrays that broadcast against `x` (per-block
    options in a batched decomposition).
    """
    threshold = jnp.asarray(threshold, x.dtype)
    max_coeff = jnp.asarray(max_coeff, x.dtype)
    clipped = jnp.clip(x, -max_coeff, max_coeff)
    return jnp.where(jnp.abs(x) < threshold, jnp.zeros_like(x), round_pow2(clipped))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def quantize_pow2_ste(x: Array, threshold: float = 0.0, max_coeff: float = 32.0) -> Array:
    """`quantize_pow2` whose gradient is the identity (straight-through estimator)."""
    return quantize_pow2(x, threshold, max_coeff)


def _quantize_pow2_ste_fwd(x, threshold, max_coeff):
    return quantize_pow2(x, threshold, max_coeff), None


def _quantize_pow2_ste_bwd(threshold, max_coeff, residuals, cotangent):
    # Rounding is flat almost everywhere; the STE passes the cotangent through unchanged so the
    # latent coefficients keep learning (docs/method.md 1.4).
    del threshold, max_coeff, residuals
    return (cotangent,)


quantize_pow2_ste.defvjp(_quantize_pow2_ste_fwd, _quantize_pow2_ste_bwd)


def is_power_of_two(value: float) -> bool:
    """True when `value` is exactly 2^e for an integer e."""
    if not math.isfinite(value) or value <= 0:
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def min_coeff(threshold: float) -> float:
    """Smallest non-zero magnitude `quantize_pow2` can produce for `threshold` (0 when threshold is 0).

    The reference's threshold 4e-3 gives 2^-8: values at the threshold round to it.
    """
    if threshold <= 0:
        return 0.0
    mantissa, exponent = math.frexp(threshold)
    return math.ldexp(1.0, exponent if mantissa > 0.75 else exponent - 1)


def ceil_pow2(threshold: float) -> float:
    """Smallest power of two >= `threshold`: the reference bucket switch's smallest magnitude
    (4e-3 -> 2^-7), one step above `min_coeff` unless the threshold is a power of two."""
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold={threshold!r} must be a finite number > 0")
    mantissa, exponent = math.frexp(threshold)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def exponents(x: Array) -> Array:
    """Integer exponent e of each non-zero power-of-two entry ±2^e (garbage where x == 0)."""
    _, exponent = jnp.frexp(x)
    return exponent - 1
