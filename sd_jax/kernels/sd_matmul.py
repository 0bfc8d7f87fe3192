"""A fused rebuild-and-multiply kernel: y = x @ W with W = from_blocks(C @ B) never in HBM (docs/kernels.md).

The kernel reads one int8 code per entry of C and the basis B, rebuilds a (row_tile x col_tile)
tile of W in on-chip memory for each of the k columns of a block, and multiplies it into a float32
accumulator; W itself is never written. `sd_matmul` runs dense kernels; `sd_conv` runs convolutions
(1 x 1 and k x k, any stride and padding) as a GEMM over patches gathered by XLA. Depthwise kernels
have no GEMM form and are refused.

Code format (one int8 per entry of C): 0 is a zero coefficient; any other code c stands for
sign(c) * 2^(|c| + exponent_offset), with one `exponent_offset` per tensor (the smallest exponent
minus one), so a tensor may span 127 exponents. The kernel turns |c| into the float 2^(|c| + offset)
by shifting the biased exponent into place (no multiplier), and a power of two times B is exact.

Kernel layout, for a blocking with `splits` blocks of `rows` rows per output unit (docs/method.md
1.1; for a k x k convolution a split is a group of input channels and a row a (channel, kernel row)
pair): row q = s * rows + r of output unit o holds the k inputs of block row r of split s. The
packed form pads `rows` to a multiple of the row tile, so a row tile never straddles two blocks and
needs one basis per output unit:
    codes  (k, splits * padded_rows, padded_dout) int8    codes[l, q, o] = code of C[o*splits+s, r, l]
    basis  (splits, k, k, padded_dout) float32           basis[s, l, j, o] = B[o*splits+s, l, j]
W split by column j is W_j[q, o] = sum_l C_l[q, o] * basis[s, l, j, o], and y = sum_j x_j @ W_j with
x_j[b, q] the input that meets column j of row q. The grid is (batch tiles, output tiles, splits);
each program sums its split into a float32 partial, and XLA adds the splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

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


def default_col_tile(dout: int, splits: int) -> int:
    """Output units per program: about 512 programs (output tiles x block splits), a few per GPU
    multiprocessor so that enough loads are in flight, within 16..128."""
    return max(16, min(128, pl.next_power_of_2(max(1, dout * splits // 512))))


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
    if spec.layout == "depthwise":
        raise ValueError(
            f"the fused kernel takes dense kernels and convolutions; a depthwise kernel {spec.shape} (one "
            "kh x kw block per channel, no compression) has no GEMM form: run it through sd_jax.nn's SDConv")
    row_tile = default_row_tile(spec.rows) if row_tile is None else row_tile
    _check_tile("row_tile", row_tile)
    col_tile = default_col_tile(spec.num_outputs, spec.blocks_per_output) if col_tile is None else col_tile
    _check_tile("col_tile", col_tile)
    coeff = np.asarray(coeff, np.float32)
    basis = np.asarray(basis, np.float32)
    mask = np.ones(coeff.shape, bool) if mask is None else np.asarray(mask, bool)
    expected = (("C", coeff, spec.block_shape), ("mask", mask, spec.block_shape),
                ("B", basis, (spec.num_blocks, spec.k, spec.k)))
    for name, value, shape in expected:
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} for the blocking of {spec.shape}")
    coeff = np.where(mask, coeff, np.float32(0))
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


def _kernel(x_ref, codes_ref, basis_ref, out_ref, *, k, row_tile, steps, exponent_offset):
    # One block split s of one (batch tile, output tile): x_ref (k, batch_tile, padded_rows);
    # codes_ref (k, padded_rows, col_tile); basis_ref (k, k, col_tile); out_ref (batch_tile, col_tile).
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    basis = [[basis_ref[l, j, :][None, :] for j in range(k)] for l in range(k)]  # read once per program

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * row_tile, row_tile), row_tile)
        coeff = [_decode(codes_ref[l, rows, :], exponent_offset) for l in range(k)]  # k x (row_tile, col_tile)
        for j in range(k):
            weight = sum(coeff[l] * basis[l][j] for l in range(k))  # W_j tile, on chip
            acc += jnp.dot(x_ref[j, :, rows], weight.astype(x_ref.dtype), precision=precision,
                           preferred_element_type=jnp.float32)
        return acc

    out_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros(out_ref.shape, jnp.float32))


def sd_matmul(x: Array, packed: PackedSD, *, batch_tile: int | None = None, interpret: bool | None = None) -> Array:
    """y = x @ W for x (..., din) float32 or bfloat16 and W a packed dense kernel (din, dout).

    The result has x's dtype; products accumulate in float32. `batch_tile` (rows of x per program)
    defaults to the batch's next power of two within 16..128. `interpret` defaults to True on CPU
    (Pallas interpret mode) and False on an accelerator.
    """
    spec = packed.spec
    if len(spec.shape) != 2:
        raise ValueError(f"sd_matmul takes a dense (din, dout) kernel, got a {spec.kind} kernel {spec.shape}; "
                         "run convolutions through sd_conv")
    _check_input(x, spec.shape[0], spec)
    leading = x.shape[:-1]
    y = _fused(x.reshape(-1, spec.shape[0]), packed, *_call_options(x, batch_tile, interpret))
    return y.reshape(*leading, spec.num_outputs)


def sd_conv(
    x: Array,
    packed: PackedSD,
    *,
    strides: int | tuple[int, int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    kernel_dilation: int | tuple[int, int] = 1,
    batch_tile: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """The convolution of NHWC x with a packed (kh, kw, cin, cout) kernel, as nn.Conv computes it.

    Every output position is one row of a GEMM against W: its input patches are gathered by XLA
    (`lax.conv_general_dilated_patches`, in HBM: kh * kw times the input), W is rebuilt on chip.
    Options and dtypes as `sd_matmul`; `strides`, `padding` and `kernel_dilation` as nn.Conv's.
    """
    spec = packed.spec
    if len(spec.shape) != 4:
        raise ValueError(f"sd_conv takes a (kh, kw, cin, cout) kernel, got a {spec.kind} kernel {spec.shape}; "
                         "run dense kernels through sd_matmul")
    if x.ndim != 4:
        raise ValueError(f"x has shape {x.shape}; sd_conv takes NHWC images (batch, height, width, channels)")
    kh, kw, cin, cout = spec.shape
    _check_input(x, cin, spec)
    pair = lambda value: (value, value) if isinstance(value, int) else tuple(value)
    patches = jax.lax.conv_general_dilated_patches(  # (..., cin * kh * kw), channel-major
        x, (kh, kw), pair(strides), padding, rhs_dilation=pair(kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    y = _fused(patches.reshape(-1, cin * kh * kw), packed, *_call_options(x, batch_tile, interpret))
    return y.reshape(*patches.shape[:-1], cout)


def _check_input(x: Array, inputs: int, spec: blocking.BlockSpec) -> None:
    if x.ndim < 1 or x.shape[-1] != inputs:
        raise ValueError(f"x has shape {x.shape}; its last axis must be the kernel's {inputs} inputs "
                         f"(kernel {spec.shape})")
    if jnp.dtype(x.dtype).name not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the kernel takes {DTYPES}: cast x first")


def _call_options(x: Array, batch_tile: int | None, interpret: bool | None) -> tuple[int, str]:
    """(batch tile, target): 'interpret', or the backend the kernel lowers for ('gpu': Triton)."""
    if batch_tile is None:
        batch_tile = max(16, min(128, pl.next_power_of_2(max(1, math.prod(x.shape[:-1])))))
    _check_tile("batch_tile", batch_tile)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return batch_tile, "interpret" if interpret else jax.default_backend()


def _blocked_inputs(x: Array, spec: blocking.BlockSpec) -> Array:
    """x (batch, inputs) -> (batch, splits, rows, k), each input where its weight sits in the blocks.

    Dense kernels: the input vector zero-padded and cut into rows of k. k x k convolutions: patches
    ordered (channel, kernel row, kernel column), channels zero-padded to the groups.
    """
    batch, splits, rows, k = x.shape[0], spec.blocks_per_output, spec.rows, spec.k
    if spec.layout == "dense_rows":
        return jnp.pad(x, ((0, 0), (0, splits * rows * k - x.shape[1]))).reshape(batch, splits, rows, k)
    kh, kw, cin, _ = spec.shape
    x = jnp.pad(x.reshape(batch, cin, kh * kw), ((0, 0), (0, splits * spec.inputs_per_block - cin), (0, 0)))
    return x.reshape(batch, splits, rows, k)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fused(x: Array, packed: PackedSD, batch_tile: int, target: str) -> Array:
    """x (batch, inputs) @ W through the kernel; `target` is 'interpret' or the backend it lowers for."""
    spec = packed.spec
    splits, rows, k = spec.blocks_per_output, spec.rows, spec.k
    batch = x.shape[0]
    padded_batch = -(-batch // batch_tile) * batch_tile
    # -> x_j (k, batch, splits * padded_rows) in the codes' row order, zeros in all padding.
    x = jnp.pad(_blocked_inputs(x, spec), ((0, padded_batch - batch), (0, 0), (0, packed.padded_rows - rows), (0, 0)))
    x = x.transpose(3, 0, 1, 2).reshape(k, padded_batch, splits * packed.padded_rows)
    padded_dout = packed.codes.shape[2]
    kernel = functools.partial(_kernel, k=k, row_tile=packed.row_tile, steps=packed.padded_rows // packed.row_tile,
                               exponent_offset=packed.exponent_offset)
    # The grid runs the block splits in parallel too (split-K): float32 partial sums, added by XLA.
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, padded_batch, padded_dout), jnp.float32),
        grid=(padded_batch // batch_tile, padded_dout // packed.col_tile, splits),
        in_specs=[
            pl.BlockSpec((k, batch_tile, packed.padded_rows), lambda b, o, s: (0, b, s)),
            pl.BlockSpec((k, packed.padded_rows, packed.col_tile), lambda b, o, s: (0, s, o)),
            pl.BlockSpec((None, k, k, packed.col_tile), lambda b, o, s: (s, 0, 0, o)),
        ],
        out_specs=pl.BlockSpec((None, batch_tile, packed.col_tile), lambda b, o, s: (s, b, o)),
        interpret=target == "interpret",
        compiler_params=pltriton.CompilerParams() if target == "gpu" else None,
        name="sd_matmul",
    )(x, packed.codes, packed.basis)
    return partial.sum(axis=0)[:batch, :spec.num_outputs].astype(x.dtype)


def rebuild(packed: PackedSD) -> Array:
    """The kernel W = from_blocks(C @ B) in its layer shape, rebuilt by XLA (in HBM) from the packed form."""
    spec = packed.spec
    splits, rows, k, dout = spec.blocks_per_output, spec.rows, spec.k, spec.num_outputs
    coeff = _decode(packed.codes, packed.exponent_offset).reshape(k, splits, packed.padded_rows, -1)
    coeff = coeff[:, :, :rows, :dout].transpose(3, 1, 2, 0).reshape(spec.block_shape)
    basis = packed.basis[..., :dout].transpose(3, 0, 1, 2).reshape(spec.num_blocks, k, k)
    return blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", coeff, basis), spec)
