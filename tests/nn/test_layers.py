"""Tests for sd_jax/nn/layers.py: SDConv and SDDense."""
import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.core import blocking, pow2
from sd_jax.nn import SD_COLLECTIONS, SDConv, SDDense
from sd_jax.nn.layers import rebuild_kernel


def _is_zero_or_signed_power_of_two(values):
    mantissa, _ = np.frexp(np.asarray(values, np.float64))
    return (values == 0) | (np.abs(mantissa) == 0.5)


def _init(layer, x, seed=0):
    return layer.init(jax.random.key(seed), x)


def _kernel(layer, variables, shape, kind):
    """The layer's rebuilt kernel, recomputed from its variables outside the layer."""
    spec = blocking.block_spec(shape, kind, group_size=layer.group_size, row_length=layer.row_length,
                               max_rows=layer.max_rows)
    return rebuild_kernel(variables["sd_coeff"]["coeff"], variables["sd_basis"]["basis"],
                          variables["sd_mask"]["mask"], spec, mode=layer.mode,
                          threshold=layer.threshold, max_coeff=layer.max_coeff)


CONV_CASES = [
    # (kernel, strides, padding, groups, dilation, cin, features): the conv kinds the zoo builds.
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 1, 1, 8, 16),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 1, 1, 70, 5),  # two input-channel groups, padded
    ((1, 1), (2, 2), ((0, 0), (0, 0)), 1, 1, 10, 12),  # 1x1: dense-row blocking
    ((3, 3), (1, 1), "SAME", 6, 1, 6, 6),  # depthwise
    ((5, 5), (1, 1), "VALID", 1, 1, 3, 6),  # LeNet
    ((7, 7), (2, 2), ((3, 3), (3, 3)), 1, 1, 3, 8),  # ImageNet stem
    ((3, 3), (1, 1), "SAME", 2, 2, 4, 6),  # grouped, dilated
]


@pytest.mark.parametrize("kernel_size,strides,padding,groups,dilation,cin,features,mode",
                         [case + ("latent",) for case in CONV_CASES] + [CONV_CASES[1] + ("pow2",)])
def test_sd_conv_equals_conv_with_the_rebuilt_kernel(kernel_size, strides, padding, groups, dilation, cin,
                                                     features, mode):
    kwargs = dict(features=features, kernel_size=kernel_size, strides=strides, padding=padding,
                  feature_group_count=groups, kernel_dilation=dilation, use_bias=True)
    layer = SDConv(mode=mode, **kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, cin))
    variables = _init(layer, x)
    variables["params"]["bias"] = jnp.arange(features, dtype=jnp.float32)
    shape = (*kernel_size, cin // groups, features)
    kind = "depthwise" if groups == cin == features else "conv"
    kernel = _kernel(layer, variables, shape, kind)
    assert kernel.shape == shape
    expected = nn.Conv(**kwargs).apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}, x)
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["latent", "pow2"])
@pytest.mark.parametrize("din,features", [(20, 7), (700, 3)])
def test_sd_dense_equals_dense_with_the_rebuilt_kernel(din, features, mode):
    layer = SDDense(features=features, mode=mode)
    x = jax.random.normal(jax.random.key(1), (4, din))
    variables = _init(layer, x)
    kernel = _kernel(layer, variables, (din, features), "dense")
    expected = nn.Dense(features).apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}, x)
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_variables_live_in_the_sd_collections_with_block_shapes():
    layer = SDConv(features=16, kernel_size=(3, 3), use_bias=True)
    variables = _init(layer, jnp.zeros((1, 8, 8, 70)))
    spec = blocking.block_spec((3, 3, 70, 16), "conv")
    n, m, k = spec.block_shape
    assert set(variables) == {"params", *SD_COLLECTIONS}
    assert variables["params"]["bias"].shape == (16,) and set(variables["params"]) == {"bias"}
    assert variables["sd_basis"]["basis"].shape == (n, k, k)
    assert variables["sd_coeff"]["coeff"].shape == (n, m, k)
    assert variables["sd_mask"]["mask"].shape == (n, m, k) and variables["sd_mask"]["mask"].dtype == jnp.bool_
    for leaf in (variables["sd_basis"]["basis"], variables["sd_coeff"]["coeff"], variables["params"]["bias"]):
        assert leaf.dtype == jnp.float32
    # Padding rows (70 channels in 2 groups of 35, padded to 36 rows of 3 each side) are masked out.
    real = np.tile(np.asarray(blocking.real_rows(spec)), (spec.num_outputs, 1))
    assert not np.asarray(variables["sd_mask"]["mask"])[~real].any()


def test_pow2_mode_stores_powers_of_two_inside_the_mask_and_zeros_outside():
    layer = SDConv(features=8, kernel_size=(3, 3), mode="pow2", threshold=0.5 / 6)  # C's std: 1 / sqrt(36)
    variables = _init(layer, jnp.zeros((1, 8, 8, 4)))
    coeff = np.asarray(variables["sd_coeff"]["coeff"])
    mask = np.asarray(variables["sd_mask"]["mask"])
    assert _is_zero_or_signed_power_of_two(coeff).all()
    assert (coeff[mask] != 0).all() and (coeff[~mask] == 0).all()
    assert 0.4 < mask.mean() < 0.8  # P(|z| >= 0.5) = 0.62 for z ~ N(0, 1)


def test_latent_mode_quantizes_the_float_coefficients_in_the_forward_pass():
    layer = SDDense(features=6, mode="latent", threshold=0.1, max_coeff=2.0)
    x = jax.random.normal(jax.random.key(1), (3, 9))
    variables = _init(layer, x)
    coeff = np.asarray(variables["sd_coeff"]["coeff"])
    assert not _is_zero_or_signed_power_of_two(coeff).all()  # a float latent is stored
    spec = blocking.block_spec((9, 6), "dense")
    quantized = np.asarray(pow2.quantize_pow2(coeff, 0.1, 2.0)) * np.asarray(variables["sd_mask"]["mask"])
    blocks = np.einsum("nmk,nkj->nmj", quantized, np.asarray(variables["sd_basis"]["basis"]))
    kernel = np.asarray(blocking.from_blocks(blocks, spec))
    np.testing.assert_allclose(layer.apply(variables, x), x @ kernel + np.asarray(variables["params"]["bias"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["latent", "pow2"])
def test_coefficient_gradient_is_straight_through_and_zero_outside_the_mask(mode):
    layer = SDConv(features=5, kernel_size=(3, 3), mode=mode, threshold=0.3)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    variables = _init(layer, x)
    spec = blocking.block_spec((3, 3, 4, 5), "conv")
    mask = variables["sd_mask"]["mask"]
    basis = variables["sd_basis"]["basis"]

    def loss_of_coeff(coeff):
        return jnp.sum(layer.apply({**variables, "sd_coeff": {"coeff": coeff}}, x) ** 2)

    coeff = variables["sd_coeff"]["coeff"]
    grad = jax.grad(loss_of_coeff)(coeff)

    # Straight-through: the gradient of the loss as a function of the quantized coefficients itself.
    def loss_of_effective(effective):
        kernel = blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", jnp.where(mask, effective, 0.0), basis), spec)
        y = nn.Conv(5, (3, 3)).apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}, x)
        return jnp.sum(y**2)

    effective = pow2.quantize_pow2(coeff, 0.3, 32.0) if mode == "latent" else coeff
    np.testing.assert_allclose(grad, jax.grad(loss_of_effective)(effective), rtol=1e-4, atol=1e-5)
    assert (np.asarray(grad)[~np.asarray(mask)] == 0).all()
    assert np.abs(np.asarray(grad)[np.asarray(mask)]).sum() > 0


def test_basis_and_bias_receive_gradients():
    layer = SDDense(features=4)
    x = jax.random.normal(jax.random.key(1), (3, 12))
    variables = _init(layer, x)
    trainable = {c: variables[c] for c in ("params", "sd_basis", "sd_coeff")}
    grads = jax.grad(lambda t: jnp.sum(layer.apply({**t, "sd_mask": variables["sd_mask"]}, x) ** 2))(trainable)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.abs(np.asarray(leaf)).sum() > 0


def _rebuilt_kernel_moments(layer, x, shape, kind):
    values = np.asarray(_kernel(layer, _init(layer, x), shape, kind)).reshape(-1)
    return values.mean(), values.var()


# The orthogonal bases make the variance hold per layer, not only on average over seeds: one draw
# must already be within a few per cent of the target.


@pytest.mark.parametrize("mode", ["latent", "pow2"])
@pytest.mark.parametrize("init_scheme,scale", [("lecun", 1.0), ("he", 2.0)])
def test_conv_initial_kernel_has_the_initialiser_variance(init_scheme, scale, mode):
    layer = SDConv(features=64, kernel_size=(3, 3), init_scheme=init_scheme, mode=mode)
    shape = (3, 3, 96, 64)  # 96 channels: 2 groups of 48, no padding
    mean, var = _rebuilt_kernel_moments(layer, jnp.zeros((1, 4, 4, 96)), shape, "conv")
    target = scale / (3 * 3 * 96)
    assert var == pytest.approx(target, rel=0.03)
    assert abs(mean) < 0.05 * target**0.5


@pytest.mark.parametrize("din,features", [(512, 128), (100, 64)])  # 100: rows padded to 34 x 3
@pytest.mark.parametrize("init_scheme,scale", [("lecun", 1.0), ("he", 2.0)])
def test_dense_initial_kernel_has_the_initialiser_variance(din, features, init_scheme, scale):
    layer = SDDense(features=features, init_scheme=init_scheme)
    mean, var = _rebuilt_kernel_moments(layer, jnp.zeros((1, din)), (din, features), "dense")
    assert var == pytest.approx(scale / din, rel=0.03)
    assert abs(mean) < 0.05 * (scale / din) ** 0.5


def test_depthwise_and_1x1_initial_kernels_have_the_initialiser_variance():
    depthwise = SDConv(features=256, kernel_size=(3, 3), feature_group_count=256, init_scheme="he")
    _, var = _rebuilt_kernel_moments(depthwise, jnp.zeros((1, 4, 4, 256)), (3, 3, 1, 256), "depthwise")
    assert var == pytest.approx(2.0 / 9, rel=0.03)
    pointwise = SDConv(features=128, kernel_size=(1, 1))
    _, var = _rebuilt_kernel_moments(pointwise, jnp.zeros((1, 4, 4, 64)), (1, 1, 64, 128), "conv")
    assert var == pytest.approx(1.0 / 64, rel=0.03)


@pytest.mark.slow
def test_sd_layers_drop_into_the_model_zoo_factories():
    model = models.get("resnet20", num_classes=10, conv=functools.partial(SDConv, mode="pow2"), dense=SDDense)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)
    dense_model = models.get("resnet20", num_classes=10)
    dense_params = jax.eval_shape(lambda: dense_model.init(jax.random.key(0), x, train=False))["params"]
    layers = lambda tree: {path[:-1] for path in traverse_util.flatten_dict(tree)}
    kernels = {path[:-1] for path in traverse_util.flatten_dict(dense_params) if path[-1] == "kernel"}
    for collection in SD_COLLECTIONS:
        assert layers(variables[collection]) == kernels
    assert all(path[-1] != "kernel" for path in traverse_util.flatten_dict(variables["params"]))
    assert set(variables["params"]["head"]["dense"]) == {"bias"}

    @jax.jit
    def train_and_eval(variables, x):
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, model.apply({**variables, **updates}, x, train=False)

    for logits in train_and_eval(variables, x):
        assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_compute_dtype_keeps_variables_float32():
    layer = SDConv(features=4, kernel_size=(3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((1, 5, 5, 3))
    variables = _init(layer, x)
    assert all(leaf.dtype in (jnp.float32, jnp.bool_) for leaf in jax.tree_util.tree_leaves(variables))
    assert layer.apply(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("option,value,message", [
    ("mode", "float", "mode 'float' is not one of"),
    ("init_scheme", "xavier", "init_scheme 'xavier' is not one of"),
    ("max_coeff", 30.0, "max_coeff=30.0 is not a power of two"),
    ("threshold", -1.0, "threshold=-1.0 must be a finite number >= 0"),
])
def test_bad_sd_option_raises_value_error(option, value, message):
    with pytest.raises(ValueError, match=message):
        _init(SDDense(features=3, name="head/dense", **{option: value}), jnp.ones((1, 6)))


def test_sd_conv_rejects_non_image_input_and_unsupported_padding():
    with pytest.raises(ValueError, match="is not \\(batch, height, width, channels\\)"):
        _init(SDConv(features=3, kernel_size=(3, 3)), jnp.ones((5, 5, 3)))
    with pytest.raises(ValueError, match="padding 'CIRCULAR' is not supported"):
        _init(SDConv(features=3, kernel_size=(3, 3), padding="CIRCULAR"), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="feature_group_count=2 must divide"):
        _init(SDConv(features=3, kernel_size=(3, 3), feature_group_count=2), jnp.ones((1, 5, 5, 4)))


def test_variables_of_another_blocking_raise_value_error():
    x = jnp.ones((1, 5, 5, 8))
    variables = _init(SDConv(features=4, kernel_size=(3, 3), group_size=4), x)
    with pytest.raises(ValueError, match="same group_size, row_length and max_rows"):
        SDConv(features=4, kernel_size=(3, 3)).apply(variables, x)


def test_the_weight_scale_lives_in_c_so_c_and_b_train_at_comparable_speed():
    # With C of order one and B at the weight's scale s, an SGD step on C moves W by about s^2 times
    # the step a dense layer takes (1e-2 here): SD from scratch then learns almost only through B.
    layer = SDConv(features=64, kernel_size=(3, 3), mode="latent", threshold=4e-3)
    variables = _init(layer, jnp.zeros((1, 4, 4, 64)))
    basis = np.asarray(variables["sd_basis"]["basis"])
    coeff = np.asarray(variables["sd_coeff"]["coeff"])
    row_norms = np.linalg.norm(basis, axis=-1)
    assert np.allclose(row_norms, row_norms.mean(), rtol=1e-5) and 0.8 < row_norms.mean() < 1.25
    assert np.std(coeff) == pytest.approx((1 / 576) ** 0.5, rel=0.1)


def test_reference_init_draws_as_the_authors():
    # C ~ kaiming_normal_(mode='fan_out') of the (n, m, k) tensor: variance 2 / (n k); B ~ N(0, 1/k).
    layer = SDConv(features=64, kernel_size=(3, 3), mode="latent", threshold=0.0, init_scheme="reference")
    variables = _init(layer, jnp.zeros((1, 4, 4, 64)))
    coeff = np.asarray(variables["sd_coeff"]["coeff"])
    basis = np.asarray(variables["sd_basis"]["basis"])
    n, _, k = coeff.shape
    assert np.var(coeff) == pytest.approx(2 / (n * k), rel=0.05)
    assert np.var(basis) == pytest.approx(1 / k, rel=0.1)
