"""Tests for sd_jax/kernels/sd_matmul.py: the fused kernel in Pallas interpret mode against the XLA
path of the SD layers, x @ from_blocks(C ⊙ mask · B) (`sd_jax.nn.layers.rebuild_kernel`), here
computed in NumPy so the reference costs no compilation.

Tolerances. float32: the kernel sums the k products of a weight and the matmul in another order than
XLA, so results agree to float32 rounding (relative 1e-5 of the largest output). bfloat16: both
sides round W to bfloat16 and accumulate in float32; the output is rounded to bfloat16 (relative
2^-8) and a W entry whose float32 sum differs in the last bit may round the other way, so 1e-2 of
the largest output.

Interpret mode costs about a second a call, so the fast set runs two calls; the slow set covers
every shape class and dtype.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core import blocking
from sd_jax.kernels import PackedSD, pack, rebuild_matmul, sd_matmul
from sd_jax.kernels.sd_matmul import _decode, _sd_matmul, default_col_tile, default_row_tile

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _layer(shape, seed=0, kind="dense", density=0.5, **blocking_options):
    """Random SD layer: C of ±2^e (e in -8..5, the reference's range) under a random mask, B normal."""
    spec = blocking.block_spec(shape, kind, **blocking_options)
    rng = np.random.default_rng(seed)
    size = spec.block_shape
    coeff = rng.choice([-1.0, 1.0], size) * np.exp2(rng.integers(-8, 6, size))
    mask = rng.random(size) < density
    basis = rng.normal(size=(spec.num_blocks, spec.k, spec.k)) / 8
    return coeff.astype(np.float32), mask, basis.astype(np.float32), spec


def _reference(x, coeff, mask, basis, spec):
    """x @ from_blocks(C ⊙ mask · B) in NumPy float64, W first rounded to x's dtype as the layers do."""
    kernel = blocking.from_blocks(np.einsum("nmk,nkj->nmj", np.where(mask, coeff, 0), basis), spec)
    weight = np.asarray(jnp.asarray(kernel.reshape(-1, spec.num_outputs), jnp.float32).astype(x.dtype), np.float64)
    return np.asarray(x, np.float64) @ weight


def _check(shape, batch, dtype, seed=0, kind="dense", leading=(), tiles=None, **blocking_options):
    coeff, mask, basis, spec = _layer(shape, seed, kind, **blocking_options)
    packed = pack(coeff, basis, spec, mask, **(tiles or {}))
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(batch, *leading, shape[-2])), dtype)
    y = sd_matmul(x, packed)
    assert y.shape == (batch, *leading, spec.num_outputs) and y.dtype == x.dtype
    expected = _reference(x, coeff, mask, basis, spec)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=0,
                               atol=TOLERANCE[jnp.dtype(dtype).name] * scale)


def test_matches_the_xla_path_for_an_odd_sized_dense_layer_at_batch_1():
    # din 50 = 17 rows of 3 (one padded input) in 3 blocks of 6 rows, each padded to the row tile 8;
    # dout 37 padded to 48: every padding of the packed form at once.
    _check((50, 37), batch=1, dtype=jnp.float32, max_rows=7, tiles=dict(row_tile=8, col_tile=16))


def test_runs_a_1x1_convolution_over_nhwc_positions_in_bfloat16():
    _check((1, 1, 20, 24), batch=2, dtype=jnp.bfloat16, seed=5, kind="conv", leading=(3, 3), row_length=2,
           max_rows=4, tiles=dict(row_tile=2, col_tile=8))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("shape, options", [
    ((96, 96), {}),  # square, one block per unit
    ((700, 48), {}),  # tall: 4 blocks of 59 rows per unit
    ((48, 300), {}),  # wide: many programs
    ((64, 33), dict(row_length=2)),
    ((64, 33), dict(row_length=4, max_rows=5)),
    ((130, 20), dict(row_length=8)),
    ((257, 129), dict(max_rows=40)),  # non-multiples of every tile
])
def test_matches_the_xla_path_for_every_shape_class(shape, options, batch, dtype):
    _check(shape, batch, dtype, **options)


@pytest.mark.slow
def test_matches_the_xla_path_on_a_reference_sized_layer_with_default_tiles():
    _check((2048, 256), batch=4, dtype=jnp.float32, seed=7)  # the reference's 4 x 171 rows blocking


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_a_triton_kernel_for_cuda_without_a_gpu(dtype):
    # Cross-platform export runs the Pallas Triton lowering on CPU: shapes, dtypes and ops it cannot
    # lower (Triton wants power-of-two value shapes) fail here rather than on a GPU.
    coeff, mask, basis, spec = _layer((50, 37), max_rows=7)
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(lambda x, packed: _sd_matmul(x, packed, 16, "gpu")), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(jax.ShapeDtypeStruct((1, 50), dtype), pack(coeff, basis, spec, mask))
    assert triton in exported.mlir_module()


def test_codes_decode_to_c_exactly_with_the_mask_applied():
    coeff, mask, basis, spec = _layer((40, 12), seed=2, row_length=4, max_rows=6)
    coeff[0, 0, :2] = [2.0**-20, 2.0**40]  # far exponents still fit one int8 code
    packed = pack(coeff, basis, spec, mask, row_tile=4, col_tile=8)
    splits, rows, k = spec.blocks_per_output, spec.rows, spec.k
    decoded = np.asarray(jax.jit(_decode, static_argnums=1)(packed.codes, packed.exponent_offset))
    decoded = decoded.reshape(k, splits, packed.padded_rows, -1)
    assert not decoded[:, :, rows:, :].any() and not decoded[..., spec.num_outputs:].any()
    decoded = decoded[:, :, :rows, :spec.num_outputs].transpose(3, 1, 2, 0).reshape(spec.block_shape)
    np.testing.assert_array_equal(decoded, np.where(mask, coeff, 0))
    assert packed.codes.dtype == jnp.int8 and packed.hbm_bytes == packed.codes.size + 4 * packed.basis.size


def test_rebuild_matmul_is_the_xla_path_on_the_packed_inputs():
    coeff, mask, basis, spec = _layer((33, 10), seed=4, max_rows=5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 33)), jnp.float32)
    np.testing.assert_allclose(jax.jit(rebuild_matmul)(x, pack(coeff, basis, spec, mask)),
                               _reference(x, coeff, mask, basis, spec), rtol=1e-5, atol=1e-5)


def test_an_all_zero_c_gives_zeros():
    _, _, basis, spec = _layer((12, 4))
    packed = pack(np.zeros(spec.block_shape, np.float32), basis, spec)
    assert isinstance(packed, PackedSD) and not np.asarray(packed.codes).any()


@pytest.mark.parametrize("shape, kind, message", [
    ((3, 3, 8, 4), "conv", "implicit GEMM, which is not implemented"),
    ((3, 3, 1, 4), "depthwise", "'depthwise' layout"),
])
def test_pack_refuses_layouts_it_does_not_support(shape, kind, message):
    spec = blocking.block_spec(shape, kind)
    with pytest.raises(ValueError, match=message):
        pack(np.zeros(spec.block_shape, np.float32), np.zeros((spec.num_blocks, spec.k, spec.k)), spec)


def test_pack_refuses_c_that_is_not_powers_of_two():
    coeff, _, basis, spec = _layer((12, 4))
    coeff[0, 0, 0] = 0.3
    with pytest.raises(ValueError, match="not 0 or ±2\\^e; quantize it first"):
        pack(coeff, basis, spec)


def test_pack_refuses_c_spanning_more_exponents_than_a_code_holds():
    coeff, _, basis, spec = _layer((12, 4))
    coeff[0, 0, :2] = [2.0**-100, 2.0**100]
    with pytest.raises(ValueError, match="more than the 127 an int8 code holds"):
        pack(coeff, basis, spec)


def test_pack_refuses_wrong_shapes_and_tiles():
    coeff, _, basis, spec = _layer((12, 4))
    with pytest.raises(ValueError, match=r"C has shape \(4, 3, 3\), expected"):
        pack(coeff[:, :3], basis, spec)
    with pytest.raises(ValueError, match="row_tile=12 must be a positive power of two"):
        pack(coeff, basis, spec, row_tile=12)
    with pytest.raises(ValueError, match="B holds NaN"):
        pack(coeff, np.full_like(basis, np.nan), spec)


def test_sd_matmul_refuses_wrong_inputs():
    coeff, _, basis, spec = _layer((12, 4))
    packed = pack(coeff, basis, spec)
    with pytest.raises(ValueError, match="last axis must be the kernel's 12 inputs"):
        sd_matmul(jnp.ones((2, 13)), packed)
    with pytest.raises(ValueError, match="dtype int32; sd_matmul takes"):
        sd_matmul(jnp.ones((2, 12), jnp.int32), packed)
    with pytest.raises(ValueError, match="batch_tile=3 must be a positive power of two"):
        sd_matmul(jnp.ones((2, 12)), packed, batch_tile=3)


def test_default_tiles_pad_least_and_keep_programs_many():
    assert default_row_tile(171) == 16 and default_row_tile(192) == 64 and default_row_tile(6) == 16
    assert default_col_tile(4096) == 32 and default_col_tile(10) == 16 and default_col_tile(10**5) == 128
