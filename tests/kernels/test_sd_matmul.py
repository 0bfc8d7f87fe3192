"""Tests for sd_jax/kernels/sd_matmul.py: the fused kernel in Pallas interpret mode against the XLA
path of the SD layers: W = from_blocks(C ⊙ mask · B) (`sd_jax.nn.layers.rebuild_kernel`, here in
NumPy), then x @ W or lax.conv_general_dilated(x, W) as nn.Dense and nn.Conv compute them.

Tolerances. float32: the kernel sums the k products of a weight and the matmul in another order than
XLA, so results agree to float32 rounding (relative 1e-5 of the largest output). bfloat16: both
sides round W to bfloat16 and accumulate in float32; the output is rounded to bfloat16 (relative
2^-8) and a W entry whose float32 sum differs in the last bit may round the other way, so 1e-2 of
the largest output.

Interpret mode costs about a second a call, so the fast set runs three calls; the slow set covers
every shape class and dtype.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core import blocking
from sd_jax.kernels import PackedSD, pack, rebuild, sd_conv, sd_matmul
from sd_jax.kernels.sd_matmul import _decode, _fused, default_col_tile, default_row_tile
from sd_jax.nn import SD_BASIS, SD_COEFF, SD_MASK, SDConv, SDDense

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


def _kernel(coeff, mask, basis, spec, dtype):
    """from_blocks(C ⊙ mask · B) in NumPy, rounded to x's dtype as the layers round it, as float32."""
    kernel = blocking.from_blocks(np.einsum("nmk,nkj->nmj", np.where(mask, coeff, 0), basis), spec)
    return jnp.asarray(kernel, jnp.float32).astype(dtype).astype(jnp.float32)


def _check(shape, batch, dtype, seed=0, kind="dense", image=None, conv=None, tiles=None, **blocking_options):
    """The kernel against XLA for a dense layer, or with `image` (h, w) a convolution with `conv` options."""
    coeff, mask, basis, spec = _layer(shape, seed, kind, **blocking_options)
    packed = pack(coeff, basis, spec, mask, **(tiles or {}))
    weight = _kernel(coeff, mask, basis, spec, dtype)
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(batch, *(image or ()), shape[-2])), dtype)
    if image is None:
        y = sd_matmul(x, packed)
        expected = np.asarray(x, np.float64) @ np.asarray(weight, np.float64)
    else:
        conv = {"strides": 1, "padding": "SAME", **(conv or {})}
        y = sd_conv(x, packed, **conv)
        expected = np.asarray(jax.lax.conv_general_dilated(
            x.astype(jnp.float32), weight, (conv["strides"],) * 2, conv["padding"],
            rhs_dilation=(conv.get("kernel_dilation", 1),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest"), np.float64)
    assert y.shape == expected.shape and y.dtype == x.dtype
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=0,
                               atol=TOLERANCE[jnp.dtype(dtype).name] * scale)


def test_matches_the_xla_path_for_an_odd_sized_dense_layer_at_batch_1():
    # din 50 = 17 rows of 3 (one padded input) in 3 blocks of 6 rows, each padded to the row tile 8;
    # dout 37 padded to 48: every padding of the packed form at once.
    _check((50, 37), batch=1, dtype=jnp.float32, max_rows=7, tiles=dict(row_tile=8, col_tile=16))


def test_runs_a_1x1_convolution_in_bfloat16():
    _check((1, 1, 20, 24), batch=2, dtype=jnp.bfloat16, seed=5, kind="conv", image=(3, 3), row_length=2,
           max_rows=4, tiles=dict(row_tile=2, col_tile=8))


def test_runs_a_strided_3x3_convolution_with_padded_channel_groups():
    # cin 20 in groups of at most 8: 3 groups of 7 channels, one zero-padded; 21 rows of 3 per block.
    _check((3, 3, 20, 12), batch=2, dtype=jnp.float32, seed=6, kind="conv", image=(5, 5), conv=dict(strides=2),
           group_size=8, tiles=dict(row_tile=8, col_tile=8))


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
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, image, conv, options", [
    ((3, 3, 64, 32), (6, 6), {}, {}),  # a ResNet block's conv: one group of 64 channels, 192 rows of 3
    ((3, 3, 96, 16), (7, 7), dict(strides=2, padding="VALID"), {}),  # 2 groups of 48
    ((5, 3, 10, 8), (6, 5), dict(padding=((1, 2), (0, 1))), {}),  # kh != kw, explicit padding
    ((3, 3, 6, 8), (7, 7), dict(kernel_dilation=2), {}),
    ((1, 1, 40, 24), (4, 4), dict(strides=2), dict(max_rows=5)),
])
def test_matches_the_xla_convolution_for_every_conv_class(shape, image, conv, options, dtype):
    _check(shape, 3, dtype, kind="conv", image=image, conv=conv, **options)


@pytest.mark.slow
def test_reproduces_the_sd_layers_of_sd_jax_nn_from_their_variables():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    conv = SDConv(features=8, kernel_size=(3, 3), strides=2, mode="pow2")
    dense = SDDense(features=7, mode="pow2")
    for layer, kernel_shape, kind, run in ((conv, (3, 3, 5, 8), "conv", sd_conv), (dense, (5, 7), "dense", sd_matmul)):
        variables = layer.init(jax.random.key(1), x)
        packed = pack(variables[SD_COEFF]["coeff"], variables[SD_BASIS]["basis"],
                      blocking.block_spec(kernel_shape, kind), variables[SD_MASK]["mask"])
        y = run(x, packed, strides=2) if kind == "conv" else run(x, packed)
        np.testing.assert_allclose(y + variables["params"]["bias"], layer.apply(variables, x), rtol=1e-5, atol=1e-5)


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
        jax.jit(lambda x, packed: _fused(x, packed, 16, "gpu")), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(jax.ShapeDtypeStruct((16, 50), dtype), pack(coeff, basis, spec, mask))
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


@pytest.mark.parametrize("shape, kind, options", [((33, 10), "dense", dict(max_rows=5)),
                                                  ((3, 3, 20, 4), "conv", dict(group_size=8))])
def test_rebuild_gives_the_kernel_back_from_the_packed_form(shape, kind, options):
    coeff, mask, basis, spec = _layer(shape, seed=4, kind=kind, **options)
    np.testing.assert_allclose(jax.jit(rebuild)(pack(coeff, basis, spec, mask)),
                               _kernel(coeff, mask, basis, spec, jnp.float32), rtol=1e-6, atol=1e-6)


def test_an_all_zero_c_gives_zeros():
    _, _, basis, spec = _layer((12, 4))
    packed = pack(np.zeros(spec.block_shape, np.float32), basis, spec)
    assert isinstance(packed, PackedSD) and not np.asarray(packed.codes).any()


def test_pack_refuses_a_depthwise_kernel():
    spec = blocking.block_spec((3, 3, 1, 4), "depthwise")
    with pytest.raises(ValueError, match=r"a depthwise kernel \(3, 3, 1, 4\) .* has no GEMM form"):
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
    with pytest.raises(ValueError, match=r"mask has shape \(4, 4\), expected \(4, 4, 3\)"):
        pack(coeff, basis, spec, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="row_tile=12 must be a positive power of two"):
        pack(coeff, basis, spec, row_tile=12)
    with pytest.raises(ValueError, match="B holds NaN"):
        pack(coeff, np.full_like(basis, np.nan), spec)


def test_sd_matmul_refuses_wrong_inputs():
    coeff, _, basis, spec = _layer((12, 4))
    packed = pack(coeff, basis, spec)
    with pytest.raises(ValueError, match="last axis must be the kernel's 12 inputs"):
        sd_matmul(jnp.ones((2, 13)), packed)
    with pytest.raises(ValueError, match="dtype int32; the kernel takes"):
        sd_matmul(jnp.ones((2, 12), jnp.int32), packed)
    with pytest.raises(ValueError, match="batch_tile=3 must be a positive power of two"):
        sd_matmul(jnp.ones((2, 12)), packed, batch_tile=3)
    with pytest.raises(ValueError, match="run dense kernels through sd_matmul"):
        sd_conv(jnp.ones((1, 2, 2, 12)), packed)


def test_sd_conv_refuses_wrong_inputs():
    coeff, _, basis, spec = _layer((3, 3, 4, 2), kind="conv")
    packed = pack(coeff, basis, spec)
    with pytest.raises(ValueError, match="run convolutions through sd_conv"):
        sd_matmul(jnp.ones((2, 36)), packed)
    with pytest.raises(ValueError, match=r"x has shape \(2, 4\); sd_conv takes NHWC images"):
        sd_conv(jnp.ones((2, 4)), packed)
    with pytest.raises(ValueError, match="last axis must be the kernel's 4 inputs"):
        sd_conv(jnp.ones((1, 5, 5, 3)), packed)


def test_default_tiles_pad_least_and_keep_programs_many():
    assert default_row_tile(171) == 16 and default_row_tile(192) == 64 and default_row_tile(6) == 16
    assert default_col_tile(4096, 8) == 64 and default_col_tile(10, 1) == 16 and default_col_tile(10**5, 1) == 128
