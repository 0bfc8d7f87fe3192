"""A fused rebuild-and-multiply kernel: y = x @ W with W = from_blocks(C @ B) never in HBM (docs/kernels.md).

The kernel reads one int8 code per entry of C and the basis B, rebuilds a (row_tile x col_tile)
tile of W in on-chip memory for each of the k columns of a block, and multiplies it into a float32
accumulator; W itself is never written. Supported: kernels in the "dense_rows" layout, i.e. dense
(din, dout) kernels and 1 x 1 convolutions (1, 1, cin, cout) at stride 1.

Code format (one int8 per entry of C): 0 is a zero coefficient; any other code c stands for
sign(c) * 2^(|c| + exponent_offset), with one `exponent_offset` per tensor (the smallest exponent
minus one), so a tensor may span 127 exponents. The kernel turns |c| into the float 2^(|c| + offset)
by shifting the biased exponent into place (no multiplier), and a power of two times B is exact.

Kernel layout, for a blocking with `splits` blocks of `rows` rows per output unit (docs/method.md
1.1): row q = s * rows + r of output unit o holds inputs (s * rows + r) * k + j, j < k. The packed
form pads `rows` to a multiple of the row tile, so a row tile never straddles two blocks and needs
one basis per output unit:
    codes  (k, splits * padded_rows, padded_dout) int8    codes[l, q, o] = code of C[o*splits+s, r, l]
    basis  (splits, k, k, padded_dout) float32           basis[s, l, j, o] = B[o*splits+s, l, j]
W split by column j is W_j[q, o] = sum_l C_l[q, o] * basis[s, l, j, o], and y = sum_j x_j @ W_j with
x_j[b, q] = x[b, q * k + j].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sd_jax.core import blocking

Array = jax.Array

DTYPES = ("float32", "bfloat16")  # input dtypes of x; accumulation is float32 for both
_FLOAT32_EXPONENT_BIAS = 127
_FLOAT32_FRACTION_BITS = 23
_MAX_CODE = 127


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "basis"],
                   meta_fields=["spec", "exponent_offset", "padded_rows", "row_tile", "col_tile"])
@dataclasses.dataclass(frozen=True)
class PackedSD:
    """One SD kernel in the fused kernel's input form (see the module docstring); a pytree."""

    codes: Array  # (k, splits * padded_rows, padded_dout) int8
    basis: Array  # (splits, k, k, padded_dout) float32
    spec: blocking.BlockSpec
    exponent_offset: int  # a code c != 0 is sign(c) * 2^(|c| + exponent_offset)
    padded_rows: int  # rows per block, padded to a multiple of row_tile
    row_tile: int  # rows of a block rebuilt per step (each row holds k inputs)
    col_tile: int  # output units per program

    @property
    def hbm_bytes(self) -> int:
        """Bytes the kernel reads for the weight: the codes and B, padding included."""
        return self.codes.size * self.codes.dtype.itemsize + self.basis.size * self.basis.dtype.itemsize


def _check_tile(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a positive power of two (GPU tiles are powers of two)")


def default_row_tile(rows: int) -> int:
    """Rows rebuilt per step: the tile of 16, 32 or 64 (a GPU dot needs 16) that pads a block least,
    the larger on a tie (171 rows, the reference's 4096-input blocks: 16, padding to 176, not 192)."""
    return min((16, 32, 64), key=lambda tile: (-(-rows // tile) * tile, -tile))


def default_col_tile(dout: int) -> int:
    """Output units per program: enough programs (about 128) to keep a GPU's memory system busy."""
    return max(16, min(128, pl.next_power_of_2(max(1, dout // 128))))


def pack(
    coeff: Array | np.ndarray,
    basis: Array | np.ndarray,
    spec: blocking.BlockSpec,
    mask: Array | np.ndarray | None = None,
    *,
    row_tile: int | None = None,
    col_tile: int | None = None,
) -> PackedSD:
    """The fused kernel's input form of one SD layer's C (n, m, k), optional mask and B (n, k, k).

    Runs on the host (it checks values), once per layer. C (masked) must hold only 0 and ±2^e, as
    the packed file and a bucket-switch layer do; a latent C is quantized first with
    `sd_jax.core.pow2.quantize_pow2`. Tiles default to `default_row_tile` and `default_col_tile`;
    on a GPU every tile must be at least 16 (the dot's smallest shape).
    """
    if spec.layout != "dense_rows":
        raise ValueError(
            f"sd_matmul supports dense kernels and 1 x 1 convolutions ('dense_rows' blocking); got a "
            f"{spec.kind} kernel {spec.shape} in the {spec.layout!r} layout. A k x k convolution needs an "
            "implicit GEMM, which is not implemented: run it through sd_jax.nn's SDConv")
    row_tile = default_row_tile(spec.rows) if row_tile is None else row_tile
    _check_tile("row_tile", row_tile)
    col_tile = default_col_tile(spec.num_outputs) if col_tile is None else col_tile
    _check_tile("col_tile", col_tile)
    coeff = np.asarray(coeff, np.float32)
    basis = np.asarray(basis, np.float32)
    for name, value, shape in (("C", coeff, spec.block_shape), ("B", basis, (spec.num_blocks, spec.k, spec.k))):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} for the blocking of {spec.shape}")
    if mask is not None:
        coeff = np.where(np.asarray(mask, bool), coeff, np.float32(0))
    if not np.isfinite(basis).all():
        raise ValueError("B holds NaN or inf; fix the weights before packing")
    codes, exponent_offset = _encode(coeff)

    dout, splits, rows, k = spec.num_outputs, spec.blocks_per_output, spec.rows, spec.k
    padded_rows = -(-rows // row_tile) * row_tile
    padded_dout = -(-dout // col_tile) * col_tile
    codes = codes.reshape(dout, splits, rows, k)
    codes = np.pad(codes, ((0, padded_dout - dout), (0, 0), (0, padded_rows - rows), (0, 0)))
    codes = codes.transpose(3, 1, 2, 0).reshape(k, splits * padded_rows, padded_dout)
    basis = np.pad(basis.reshape(dout, splits, k, k), ((0, padded_dout - dout), (0, 0), (0, 0), (0, 0)))
    basis = basis.transpose(1, 2, 3, 0)
    return PackedSD(jnp.asarray(codes), jnp.asarray(basis), spec, exponent_offset, padded_rows, row_tile, col_tile)


def _encode(coeff: np.ndarray) -> tuple[np.ndarray, int]:
    """int8 codes of C and the tensor's exponent offset (see the module docstring)."""
    nonzero = coeff != 0
    mantissa, exponent = np.frexp(coeff)  # coeff = mantissa * 2^exponent, |mantissa| = 1/2 for 2^e
    if not np.all(np.abs(mantissa[nonzero]) == 0.5):
        raise ValueError("C has entries that are not 0 or ±2^e; quantize it first "
                         "(sd_jax.core.pow2.quantize_pow2, as a 'latent'-mode layer does)")
    exponent = exponent.astype(np.int64) - 1
    if not nonzero.any():
        return np.zeros(coeff.shape, np.int8), 0
    low, high = int(exponent[nonzero].min()), int(exponent[nonzero].max())
    if high - low + 1 > _MAX_CODE:
        raise ValueError(f"C spans exponents {low}..{high}, more than the {_MAX_CODE} an int8 code holds; "
                         "clip it with max_coeff or raise the threshold")
    if low < 1 - _FLOAT32_EXPONENT_BIAS or high > _FLOAT32_EXPONENT_BIAS:
        raise ValueError(f"C has exponents {low}..{high}, outside float32's normal range -126..127")
    offset = low - 1
    codes = np.where(nonzero, np.sign(mantissa) * (exponent - offset), 0)
    return codes.astype(np.int8), offset


def _decode(codes: Array, exponent_offset: int) -> Array:
    """float32 C from int8 codes: the biased exponent shifted into place, the sign applied, 0 kept."""
    codes = codes.astype(jnp.int32)
    biased = jnp.abs(codes) + (exponent_offset + _FLOAT32_EXPONENT_BIAS)
    magnitude = jax.lax.bitcast_convert_type(jnp.left_shift(biased, _FLOAT32_FRACTION_BITS), jnp.float32)
    return jnp.where(codes == 0, 0.0, jnp.where(codes < 0, -magnitude, magnitude))


def _kernel(x_ref, codes_ref, basis_ref, out_ref, *, k, row_tile, tiles_per_block, steps, exponent_offset):
    # x_ref (k, batch_tile, splits * padded_rows); codes_ref (k, splits * padded_rows, col_tile);
    # basis_ref (splits, k, k, col_tile); out_ref (batch_tile, col_tile).
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * row_tile, row_tile), row_tile)
        split = i // tiles_per_block
        coeff = [_decode(codes_ref[l, rows, :], exponent_offset) for l in range(k)]  # k x (row_tile, col_tile)
        for j in range(k):
            weight = sum(coeff[l] * basis_ref[split, l, j, :][None, :] for l in range(k))
            acc += jnp.dot(x_ref[j, :, rows], weight.astype(x_ref.dtype), precision=precision,
                           preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def sd_matmul(x: Array, packed: PackedSD, *, batch_tile: int | None = None, interpret: bool | None = None) -> Array:
    """y = x @ W for x (..., din) float32 or bfloat16, W the packed dense or 1 x 1 conv kernel.

    A 1 x 1 convolution of NHWC x at stride 1 is `sd_matmul(x, packed)`; at stride s pass
    x[:, ::s, ::s]. The result has x's dtype; products accumulate in float32. `interpret` defaults
    to True on CPU (Pallas interpret mode) and False on an accelerator.
    """
    din = packed.spec.shape[-2]
    if x.ndim < 1 or x.shape[-1] != din:
        raise ValueError(f"x has shape {x.shape}; its last axis must be the kernel's {din} inputs "
                         f"(kernel {packed.spec.shape})")
    if jnp.dtype(x.dtype).name not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; sd_matmul takes {DTYPES}: cast x first")
    if batch_tile is None:
        batch = math.prod(x.shape[:-1])
        batch_tile = max(16, min(128, pl.next_power_of_2(max(1, batch))))
    _check_tile("batch_tile", batch_tile)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    target = "interpret" if interpret else jax.default_backend()
    return _sd_matmul(x, packed, batch_tile, target)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sd_matmul(x: Array, packed: PackedSD, batch_tile: int, target: str) -> Array:
    """The kernel call; `target` is 'interpret' or the backend it lowers for ('gpu': Triton)."""
    spec = packed.spec
    leading, din = x.shape[:-1], x.shape[-1]
    splits, rows, k = spec.blocks_per_output, spec.rows, spec.k
    batch = math.prod(leading)
    padded_batch = -(-batch // batch_tile) * batch_tile
    # x (batch, din) -> x_j (k, batch, splits * padded_rows) in the codes' row order, zeros in padding.
    x = jnp.pad(x.reshape(batch, din), ((0, padded_batch - batch), (0, splits * rows * k - din)))
    x = jnp.pad(x.reshape(padded_batch, splits, rows, k), ((0, 0), (0, 0), (0, packed.padded_rows - rows), (0, 0)))
    x = x.transpose(3, 0, 1, 2).reshape(k, padded_batch, splits * packed.padded_rows)
    total_rows, padded_dout = packed.codes.shape[1:]
    kernel = functools.partial(
        _kernel, k=k, row_tile=packed.row_tile, tiles_per_block=packed.padded_rows // packed.row_tile,
        steps=total_rows // packed.row_tile, exponent_offset=packed.exponent_offset)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_batch, padded_dout), x.dtype),
        grid=(padded_batch // batch_tile, padded_dout // packed.col_tile),
        in_specs=[
            pl.BlockSpec((k, batch_tile, total_rows), lambda b, o: (0, b, 0)),
            pl.BlockSpec((k, total_rows, packed.col_tile), lambda b, o: (0, 0, o)),
            pl.BlockSpec((splits, k, k, packed.col_tile), lambda b, o: (0, 0, 0, o)),
        ],
        out_specs=pl.BlockSpec((batch_tile, packed.col_tile), lambda b, o: (b, o)),
        interpret=target == "interpret",
        compiler_params=pltriton.CompilerParams() if target == "gpu" else None,
        name="sd_matmul",
    )(x, packed.codes, packed.basis)
    return y[:batch, :spec.num_outputs].reshape(*leading, spec.num_outputs)


def rebuild_matmul(x: Array, packed: PackedSD) -> Array:
    """The XLA path on the same packed inputs: decode C, rebuild W = from_blocks(C @ B) in HBM, x @ W."""
    spec = packed.spec
    splits, rows, k, dout = spec.blocks_per_output, spec.rows, spec.k, spec.num_outputs
    coeff = _decode(packed.codes, packed.exponent_offset).reshape(k, splits, packed.padded_rows, -1)
    coeff = coeff[:, :, :rows, :dout].transpose(3, 1, 2, 0).reshape(spec.block_shape)
    basis = packed.basis[..., :dout].transpose(3, 0, 1, 2).reshape(spec.num_blocks, k, k)
    weight = blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", coeff, basis), spec).reshape(-1, dout)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, weight.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)
