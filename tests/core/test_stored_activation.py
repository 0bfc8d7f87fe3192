"""Tests for sd_jax/core/stored_activation.py: exact forward, kernel gradient within the quantization
bound, exact input gradient, the layers' option, and the compiled step's peak memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.core import stored_activation
from sd_jax.nn import SDConv, SDDense, SDRules
from sd_jax.nn.layers import SDOptions, low_precision_factories

CONV = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
DENSE = functools.partial(jax.lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))


def _inputs(x_shape, w_shape, seed=0):
    x_key, w_key, y_key = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(x_key, x_shape) * jnp.linspace(0.1, 3.0, x_shape[-1])  # channels of unlike ranges
    return x, jax.random.normal(w_key, w_shape), y_key


def _gradients(op, x, kernel, cotangent, bits):
    """(dx, dkernel) of <op(x, kernel), cotangent>, exact (bits None) or with x stored at `bits`."""
    apply = op if bits is None else lambda x, k: stored_activation.linear_with_stored_input(op, x, k, bits)
    return jax.grad(lambda x, k: jnp.vdot(apply(x, k), cotangent), (0, 1))(x, kernel)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [7, 8])
def test_dequantized_input_is_within_half_a_step_per_channel(bits, rows):
    x, _, _ = _inputs((rows, 5), (5, 3))
    stored = stored_activation.quantize(x, bits)
    assert stored.codes.dtype == jnp.uint8
    assert stored.codes.shape == ((rows + 1) // 2 if bits == 4 else rows, 5)  # two codes a byte at 4 bits
    error = jnp.abs(stored_activation.dequantize(stored, bits, x.shape, x.dtype) - x)
    assert bool(jnp.all(error <= stored.step / 2 * (1 + 1e-5)))


def test_constant_channel_is_stored_exactly():
    x = jnp.ones((4, 3)).at[:, 1].set(jnp.arange(4.0))
    stored = stored_activation.quantize(x, 4)
    restored = stored_activation.dequantize(stored, 4, x.shape, x.dtype)
    np.testing.assert_array_equal(restored[:, [0, 2]], x[:, [0, 2]])


@pytest.mark.parametrize("op, x_shape, w_shape", [(DENSE, (32, 6), (6, 4)), (CONV, (4, 6, 6, 5), (3, 3, 5, 4))])
def test_forward_is_exact_and_kernel_gradient_within_bound(op, x_shape, w_shape):
    """|dW - dŴ| <= s_c / 2 · Σ |dy| over the rows (and output positions) for each input channel c;
    the input gradient needs only W, so it is exact; 8 bits is tighter than 4."""
    x, kernel, key = _inputs(x_shape, w_shape)
    cotangent = jax.random.normal(key, op(x, kernel).shape)
    # One compiled program for the forward passes and all three gradients.
    outputs, gradients = jax.jit(lambda x, k: (
        (op(x, k), stored_activation.linear_with_stored_input(op, x, k, 4)),
        {bits or 32: _gradients(op, x, k, cotangent, bits) for bits in (None, 4, 8)}))(x, kernel)
    np.testing.assert_array_equal(outputs[1], outputs[0])
    exact_dx, exact_dw = gradients[32]  # exact: float32
    errors = {}
    for bits in (4, 8):
        dx, dw = gradients[bits]
        np.testing.assert_allclose(dx, exact_dx, rtol=1e-6, atol=1e-6)
        step = stored_activation.quantize(x, bits).step  # (channels,)
        # Σ over rows / positions of |dy| per output channel; every tap of the kernel sees at most all of them.
        reach = jnp.sum(jnp.abs(cotangent).reshape(-1, cotangent.shape[-1]), axis=0)  # (out,)
        bound = step[:, None] / 2 * reach[None, :]  # (in, out), broadcast over the kernel's spatial axes
        errors[bits] = jnp.abs(dw - exact_dw)
        assert bool(jnp.all(errors[bits] <= bound * (1 + 1e-4) + 1e-5)), bits
    assert float(jnp.max(errors[8])) < float(jnp.max(errors[4])) / 8


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 16, True, "8"])
def test_bad_bits_are_refused(bits):
    with pytest.raises(ValueError, match="stored_activation_bits=.*is not one of \\(4, 8\\)"):
        stored_activation.check_bits(bits)
    if bits:
        with pytest.raises(ValueError, match="layer 'x': stored_activation_bits"):
            SDOptions(stored_activation_bits=bits).check("x")


def test_off_is_none_or_zero():
    assert SDOptions(stored_activation_bits=0).check("x").stored_activation_bits == 0


def _kernel_gradient_and_output(model, x, collection, bits_off_model):
    """Outputs and the gradient of the kernel's trainable variables of `model` and of `bits_off_model`,
    with the same variables."""
    variables = model.init(jax.random.key(0), x)
    loss = lambda m: jax.jit(jax.value_and_grad(
        lambda v: jnp.sum(jnp.sin(m.apply({**variables, collection: v}, x))) ))
    return loss(model)(variables[collection]), loss(bits_off_model)(variables[collection])


@pytest.mark.parametrize("layer", [
    SDConv(features=4, kernel_size=(3, 3), mode="latent"),
    SDDense(features=4, mode="latent"),
])
def test_sd_layer_stores_its_input_at_low_bits(layer):
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 5) if isinstance(layer, SDConv) else (8, 5))
    (value, grads), (exact_value, exact_grads) = _kernel_gradient_and_output(
        layer.clone(stored_activation_bits=8), x, "sd_basis", layer)
    assert float(value) == float(exact_value)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grads)):
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
        assert not np.array_equal(got, want)  # the option reached the layer


def test_dense_zoo_layers_store_their_input_at_low_bits():
    """The dense zoo's factories (`low_precision_factories`) put the stored input into nn.Conv / nn.Dense."""
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 5))
    for kind, layer_kwargs, inputs in (("conv", dict(kernel_size=(3, 3)), x), ("dense", {}, x[:, 0, 0])):
        layer = low_precision_factories(stored_activation_bits=8)[kind](features=4, **layer_kwargs)
        exact = low_precision_factories()[kind](features=4, **layer_kwargs)
        (value, grads), (exact_value, exact_grads) = _kernel_gradient_and_output(layer, inputs, "params", exact)
        assert float(value) == float(exact_value)
        scale = float(jnp.max(jnp.abs(exact_grads["kernel"])))
        np.testing.assert_allclose(grads["kernel"], exact_grads["kernel"], rtol=0, atol=0.02 * scale)
        assert not np.array_equal(grads["kernel"], exact_grads["kernel"])


def test_sd_rules_carry_the_option():
    assert SDRules(stored_activation_bits=4).select("conv1", (5, 5)).stored_activation_bits == 4


def test_a_nan_input_gives_nan_gradients_and_ends():
    x = jnp.full((4, 3), jnp.nan)
    _, dw = jax.jit(_gradients, static_argnums=(0, 4))(DENSE, x, jnp.ones((3, 2)), jnp.ones((4, 2)), 8)
    assert bool(jnp.all(jnp.isnan(dw)))


def test_compiled_gradient_of_a_conv_chain_has_a_smaller_peak_at_4_bits():
    """Six 3x3 convolutions, batch 32: the compiled gradient keeps uint8 codes instead of float32 inputs."""
    x = jnp.zeros((32, 16, 16, 16))
    kernels = [jnp.zeros((3, 3, 16, 16))] * 6

    def temp_bytes(bits):
        def loss(kernels, x):
            for kernel in kernels:
                x = CONV(x, kernel) if bits is None else stored_activation.linear_with_stored_input(CONV, x, kernel, bits)
            return jnp.sum(x**2)
        return jax.jit(jax.grad(loss)).lower(kernels, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(4) < temp_bytes(None)


def _batch_norm_reference(x, scale, bias, residual, relu, epsilon=1e-5):
    mean = jnp.mean(x, (0, 1, 2))
    variance = jnp.maximum(jnp.mean(x * x, (0, 1, 2)) - mean**2, 0.0)
    y = (x - mean) * jax.lax.rsqrt(variance + epsilon) * scale + bias
    y = y if residual is None else y + residual
    return jax.nn.relu(y) if relu else y


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("relu, with_residual", [(True, True), (True, False), (False, False)])
def test_batch_norm_forward_is_exact_and_gradients_within_bound(bits, relu, with_residual):
    """Forward equal to batch norm (+ residual, ReLU); dbias and dresidual exact (the ReLU mask is kept
    exactly); dscale within sum |dz| * step / 2 / sigma per channel (n̂ is within that of n); dx close."""
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (8, 6, 6, 5)) * jnp.linspace(0.5, 3.0, 5) + 1.0
    scale, bias = jax.random.normal(keys[1], (5,)), jax.random.normal(keys[2], (5,))
    residual = jax.random.normal(keys[3], x.shape) if with_residual else None
    cotangent = jax.random.normal(keys[4], x.shape)
    stored = lambda x, s, b, r: stored_activation.batch_norm_with_stored_input(
        x, s, b, r, bits=bits, epsilon=1e-5, relu=relu)[0]
    exact = lambda x, s, b, r: _batch_norm_reference(x, s, b, r, relu)
    np.testing.assert_array_equal(stored(x, scale, bias, residual), exact(x, scale, bias, residual))
    grads = [jax.grad(lambda *a: jnp.vdot(f(*a), cotangent), (0, 1, 2, 3) if with_residual else (0, 1, 2))(
        x, scale, bias, residual) for f in (stored, exact)]
    (dx, dscale, dbias, *dresidual), (dx0, dscale0, dbias0, *dresidual0) = grads
    np.testing.assert_allclose(dbias, dbias0, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(dresidual, dresidual0):
        np.testing.assert_allclose(mine, reference, rtol=1e-6)
    dz = cotangent if not relu else jnp.where(exact(x, scale, bias, residual) > 0, cotangent, 0.0)
    _, step = stored_activation.channel_grid(x, bits)
    sigma = jnp.sqrt(jnp.var(x, (0, 1, 2)) + 1e-5)
    bound = jnp.sum(jnp.abs(dz), (0, 1, 2)) * step / 2 / sigma
    assert bool(jnp.all(jnp.abs(dscale - dscale0) <= bound * 1.001 + 1e-5))
    assert float(jnp.linalg.norm(dx - dx0) / jnp.linalg.norm(dx0)) < (0.1 if bits == 4 else 0.01)


def test_batch_norm_with_a_bfloat16_input_keeps_its_dtype():
    x = jnp.ones((4, 3, 3, 2), jnp.bfloat16) * jnp.arange(2, dtype=jnp.bfloat16)
    y = stored_activation.batch_norm_with_stored_input(x, jnp.ones(2), jnp.zeros(2), None, bits=8, epsilon=1e-5,
                                                       relu=True)[0]
    assert y.dtype == jnp.bfloat16
    dx = jax.grad(lambda x: jnp.sum(stored_activation.batch_norm_with_stored_input(
        x, jnp.ones(2), jnp.zeros(2), None, bits=8, epsilon=1e-5, relu=True)[0].astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
