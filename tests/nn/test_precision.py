"""Tests for the precision options of sd_jax/nn/layers.py: N-bit activations and gradients, bfloat16."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from sd_jax import models
from sd_jax.core import blocking, fixed_point
from sd_jax.nn import SDConv, SDDense, SDRules
from sd_jax.nn.layers import RANGE_MOMENTUM, SD_QUANT, low_precision_factories, rebuild_kernel
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.step import create_train_state, eval_step, train_step

FEATURES = 36  # 12 rows of 3 per block: one block per output


def _identity_dense(**options):
    """An SDDense whose SD kernel is the identity, so its output is its (quantized) input."""
    layer = SDDense(FEATURES, use_bias=False, mode="pow2", name="dense", **options)
    variables = flax.core.unfreeze(jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, FEATURES))))
    spec = blocking.block_spec((FEATURES, FEATURES), "dense", group_size=layer.group_size,
                               row_length=layer.row_length, max_rows=layer.max_rows)
    coeff = blocking.to_blocks(jnp.eye(FEATURES), spec)  # entries 0 or 1 = 2^0
    variables["sd_coeff"]["coeff"] = coeff
    variables["sd_basis"]["basis"] = jnp.broadcast_to(jnp.eye(spec.k), (spec.num_blocks, spec.k, spec.k))
    variables["sd_mask"]["mask"] = coeff != 0
    return layer, variables


@functools.partial(jax.jit, static_argnums=(0,))
def _evaluate(layer, variables, x):
    return layer.apply(variables, x)


@functools.partial(jax.jit, static_argnums=(0,))
def _train(layer, variables, x, key):
    """A training pass: (output, updated sd_quant collection)."""
    return layer.apply(variables, x, mutable=[SD_QUANT], rngs={"quant": key})


def _assert_on_grid(values, bits, low, high):
    """Every row of `values` takes at most 2^bits values, all on the grid spanning its [low, high]."""
    for row, lo, hi in zip(np.asarray(values), np.broadcast_to(low, len(values)), np.broadcast_to(high, len(values))):
        assert len(np.unique(row)) <= 2**bits
        position = (row - lo) / ((hi - lo) / (2**bits - 1))
        np.testing.assert_allclose(position, np.round(position), atol=1e-3)
        assert position.min() > -1e-3 and position.max() < 2**bits - 1 + 1e-3


def _batch(key, scales=(0.1, 1.0, 30.0)):
    x = jax.random.normal(key, (len(scales), FEATURES))
    return x * jnp.asarray(scales)[:, None] + jnp.arange(len(scales))[:, None]


def test_identity_layer_passes_its_input_through():
    layer, variables = _identity_dense()
    x = _batch(jax.random.key(1))
    np.testing.assert_allclose(_evaluate(layer, variables, x), x, rtol=1e-6, atol=1e-6)


def test_training_quantizes_activations_to_2n_levels_per_sample():
    layer, variables = _identity_dense(activation_bits=3)
    x = _batch(jax.random.key(1))
    y, _ = _train(layer, variables, x, jax.random.key(0))
    _assert_on_grid(y, 3, x.min(axis=1), x.max(axis=1))
    step = (x.max(axis=1) - x.min(axis=1)) / 7
    assert np.all(np.abs(y - x).max(axis=1) <= step / 2 + 1e-5)
    assert not np.allclose(y, x)


def test_evaluation_uses_the_running_range():
    layer, variables = _identity_dense(activation_bits=4, gradient_bits=4)
    x1, x2, x3 = (_batch(jax.random.key(i)) for i in (1, 2, 3))
    # Before any training step the running range is empty and evaluation leaves x as is.
    np.testing.assert_allclose(_evaluate(layer, variables, x3), x3, rtol=1e-6)
    _, updates = _train(layer, variables, x1, jax.random.key(9))
    state = updates[SD_QUANT]
    assert int(state["count"]) == 1
    np.testing.assert_allclose(state["low"], x1.min(axis=1).mean(), rtol=1e-6)
    np.testing.assert_allclose(state["high"], x1.max(axis=1).mean(), rtol=1e-6)
    _, updates = _train(layer, {**variables, **updates}, x2, jax.random.key(9))
    state = updates[SD_QUANT]
    assert int(state["count"]) == 2
    low = RANGE_MOMENTUM * x1.min(axis=1).mean() + (1 - RANGE_MOMENTUM) * x2.min(axis=1).mean()
    high = RANGE_MOMENTUM * x1.max(axis=1).mean() + (1 - RANGE_MOMENTUM) * x2.max(axis=1).mean()
    np.testing.assert_allclose([state["low"], state["high"]], [low, high], rtol=1e-5)
    # Evaluation: no rng, nothing mutable, every sample on the one running grid (clipped to it).
    y = _evaluate(layer, {**variables, **updates}, x3)
    expected = fixed_point.quantize_uniform(x3, 4, state["low"], state["high"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    _assert_on_grid(y, 4, state["low"], state["high"])


def _input_gradient(layer, variables, x, cotangent, key):
    def loss(x):
        y, _ = layer.apply(variables, x, mutable=[SD_QUANT], rngs={"quant": key})
        return jnp.sum(y * cotangent)
    return jax.grad(loss)(x)


def test_gradients_are_quantized_to_2n_levels_per_sample_and_unbiased():
    layer, variables = _identity_dense(gradient_bits=3)
    x = jnp.zeros((3, FEATURES))
    cotangent = _batch(jax.random.key(4))
    # With an identity kernel the input gradient is the quantized cotangent itself.
    gradient = jax.jit(_input_gradient, static_argnums=0)(layer, variables, x, cotangent, jax.random.key(5))
    _assert_on_grid(gradient, 3, cotangent.min(axis=1), cotangent.max(axis=1))
    assert not np.allclose(gradient, cotangent)
    keys = jax.random.split(jax.random.key(6), 4000)
    gradients = jax.jit(jax.vmap(lambda k: _input_gradient(layer, variables, x, cotangent, k)))(keys)
    step = (cotangent.max(axis=1) - cotangent.min(axis=1)) / 7
    # Stochastic rounding: per-draw std <= step / 2, so the mean of 4000 is within ~6 sigma of exact.
    assert np.all(np.abs(gradients.mean(axis=0) - cotangent).max(axis=1) < 0.05 * step)
    # A different key gives a different rounding.
    assert not np.allclose(gradients[0], gradients[1])


def test_conv_gradients_are_unbiased_and_evaluation_needs_no_rng():
    layer = SDConv(4, (3, 3), gradient_bits=6, activation_bits=8, name="conv")
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    cotangent = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
    exact_layer = layer.clone(gradient_bits=None)
    exact = jax.jit(_input_gradient, static_argnums=0)(exact_layer, variables, x, cotangent, jax.random.key(0))
    keys = jax.random.split(jax.random.key(3), 256)
    gradients = jax.jit(jax.vmap(lambda k: _input_gradient(layer, variables, x, cotangent, k)))(keys)
    assert not np.allclose(gradients[0], exact, atol=1e-3)
    np.testing.assert_allclose(gradients.mean(axis=0), exact, atol=0.05 * float(jnp.abs(exact).max()))
    _evaluate(layer, variables, x)  # evaluation: no 'quant' rng needed


def test_training_without_a_quant_rng_raises():
    layer, variables = _identity_dense(gradient_bits=8)
    with pytest.raises(ValueError, match="layer 'dense': gradient_bits=8 needs a 'quant' rng"):
        layer.apply(variables, jnp.ones((2, FEATURES)), mutable=[SD_QUANT])


def test_variables_without_running_range_raise():
    layer, variables = _identity_dense()
    quantized = layer.clone(activation_bits=8)
    with pytest.raises(ValueError, match="layer 'dense': activation_bits=8 needs the running range sd_quant"):
        quantized.apply(variables, jnp.ones((2, FEATURES)))


@pytest.mark.parametrize("option,value", [("activation_bits", 0), ("activation_bits", 8.0), ("gradient_bits", True),
                                          ("gradient_bits", 25)])
def test_bad_bits_raise_naming_the_layer(option, value):
    with pytest.raises(ValueError, match=f"layer 'conv': {option}={value!r} is not None or an integer"):
        layer = SDConv(4, (3, 3), name="conv", **{option: value})
        jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        SDRules([("conv", {option: value})])


def test_config_sets_the_bits_and_unknown_keys_still_raise():
    config = default.get_config()
    assert config.sd.activation_bits is None and config.sd.gradient_bits is None
    assert SDRules.from_config(config).select("conv", (3, 3)).activation_bits is None
    config.sd.activation_bits, config.sd.gradient_bits = 8, 6
    options = SDRules.from_config(config).select("stage1_block0/conv1", (3, 3))
    assert (options.activation_bits, options.gradient_bits) == (8, 6)
    config.sd.gradient_bit = 8
    with pytest.raises(ValueError, match="unknown option 'gradient_bit'"):
        SDRules.from_config(config)


def _tiny_state(model, images, seed=0):
    variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(seed))
    return create_train_state(model.apply, variables, sd_optimizer(0.02, switch_bar=4), jax.random.key(seed + 1))


def _tiny_sd_mlp(dtype=jnp.float32, **options):
    return models.get("mlp", num_classes=10, sd=SDRules(mode="pow2", **options), hidden=(32,), dtype=dtype)


def test_sd_model_trains_with_8_bit_activations_and_gradients():
    model = _tiny_sd_mlp(activation_bits=8, gradient_bits=8)
    images = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
    batch = {"image": images, "label": jnp.arange(16) % 10}
    state = _tiny_state(model, images)
    assert sorted(state.frozen) == ["sd_mask", SD_QUANT]
    quant = flax.traverse_util.flatten_dict(state.frozen[SD_QUANT], sep="/")
    assert sorted(quant) == [f"{layer}/{leaf}" for layer in ("head/dense", "hidden1/dense")
                             for leaf in ("count", "high", "low")]
    step, evaluate = jax.jit(train_step), jax.jit(eval_step)
    first = float(evaluate(state, batch)["loss_sum"])
    for _ in range(6):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert float(evaluate(state, batch)["loss_sum"]) < 0.5 * first
    for layer in state.frozen[SD_QUANT].values():
        quant = layer["dense"]
        assert int(quant["count"]) == 6 and float(quant["low"]) < float(quant["high"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, "bfloat16"])  # the string is what a config passes
def test_bfloat16_zoo_model_computes_in_bf16_with_float32_variables(dtype):
    model = models.get("lenet5", num_classes=10, sd=True, dtype=dtype)
    images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    floats = [leaf for leaf in jax.tree.leaves(variables) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert len(floats) == 15 and all(leaf.dtype == jnp.float32 for leaf in floats)  # 5 SD layers: B, C, bias
    logits, intermediates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), variables, images)
    assert logits.dtype == jnp.float32
    outputs = {"/".join(path[:2]): value[0].dtype for path, value in
               flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates["intermediates"])).items()
               if len(path) == 3}  # the layers' outputs, not the blocks' (block/layer/__call__)
    assert sorted(outputs) == ["classifier/fc1", "classifier/fc2", "features/conv1", "features/conv2", "head/dense"]
    assert all(dtype == jnp.bfloat16 for dtype in outputs.values()), outputs


def test_bfloat16_sd_conv_rebuilds_the_kernel_in_float32_and_matches_float32():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    layer = SDConv(16, (3, 3), name="conv")
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    bf16_layer = layer.clone(dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(bf16_layer.apply)(variables, x).jaxpr
    products = [eqn for eqn in jaxpr.eqns if eqn.primitive.name in ("dot_general", "conv_general_dilated")]
    assert [(eqn.primitive.name, eqn.invars[0].aval.dtype) for eqn in products] == [
        ("dot_general", jnp.float32), ("conv_general_dilated", jnp.bfloat16)]  # C·B rebuild, then the conv
    y = _evaluate(bf16_layer, variables, x)
    assert y.dtype == jnp.bfloat16
    expected = _evaluate(layer, variables, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.02 * float(jnp.abs(expected).max()))


def test_bfloat16_train_step_keeps_float32_variables():
    model = _tiny_sd_mlp(dtype="bfloat16", activation_bits=8, gradient_bits=8)
    images = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
    state, metrics = jax.jit(train_step)(_tiny_state(model, images), {"image": images, "label": jnp.arange(8)})
    assert np.isfinite(float(metrics["loss"]))
    floats = [leaf for leaf in jax.tree.leaves(state.variables) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)


def test_low_precision_dense_layers_quantize_like_sd_layers():
    # The dense 8-bit baseline: same input quantizer and running range as an SD layer at 8 bits.
    model = models.get("resnet20", num_classes=10, **low_precision_factories(activation_bits=8, gradient_bits=8))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    assert "sd_coeff" not in variables and "kernel" in variables["params"]["stem"]["conv"]
    holding = lambda tree, leaf: {name.removesuffix(f"/{leaf}") for name in
                                  flax.traverse_util.flatten_dict(tree, sep="/") if name.endswith(f"/{leaf}")}
    assert holding(variables["sd_quant"], "count") == holding(variables["params"], "kernel")
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats", "sd_quant"],
                             rngs={"quant": jax.random.key(2), "dropout": jax.random.key(3)})
    assert int(updated["sd_quant"]["stem"]["conv"]["count"]) == 1
    exact = models.get("resnet20", num_classes=10).apply({k: v for k, v in variables.items() if k != "sd_quant"}, x,
                                                         train=False)
    quantized = model.apply(variables, x, train=False)  # count 0: evaluation leaves the input as is
    np.testing.assert_allclose(quantized, exact, rtol=1e-5, atol=1e-5)


def test_low_precision_factories_refuse_bad_bits():
    with pytest.raises(ValueError, match="activation_bits=0"):
        low_precision_factories(activation_bits=0, gradient_bits=8)
    with pytest.raises(ValueError, match="unknown option"):
        low_precision_factories(threshold=0.1)


@pytest.mark.parametrize("activation_range", ["sample", "batch"])
def test_activation_range_sample_or_batch_and_the_running_momentum(activation_range):
    # "batch": one range per batch, the mean of the per-sample min and max (the authors' QuantMeasure);
    # the running range keeps range_momentum of its old value.
    layer = SDDense(features=4, activation_bits=2, activation_range=activation_range, range_momentum=0.1)
    x1 = jax.random.normal(jax.random.key(0), (8, 16))
    x2 = 3 * jax.random.normal(jax.random.key(1), (8, 16))
    variables = layer.init(jax.random.key(2), x1)
    for x in (x1, x2):
        y, updated = layer.apply(variables, x, mutable=[SD_QUANT])
        variables = {**variables, **updated}
    low = 0.1 * x1.min(axis=1).mean() + 0.9 * x2.min(axis=1).mean()
    np.testing.assert_allclose(variables[SD_QUANT]["low"], low, rtol=1e-5)
    sample_low, sample_high = fixed_point.per_sample_range(x2)
    if activation_range == "batch":
        sample_low, sample_high = sample_low.mean(), sample_high.mean()
    quantized = fixed_point.quantize_activation(x2, 2, sample_low, sample_high)
    kernel = rebuild_kernel(variables["sd_coeff"]["coeff"], variables["sd_basis"]["basis"], variables["sd_mask"]["mask"],
                            blocking.block_spec((16, 4), "dense"), mode="latent", threshold=1e-3, max_coeff=32.0)
    np.testing.assert_allclose(y, quantized @ kernel + variables["params"]["bias"], rtol=1e-4, atol=1e-4)


def test_bad_activation_range_or_momentum_is_refused():
    for kwargs, message in (({"activation_range": "layer"}, "activation_range 'layer'"),
                            ({"range_momentum": 1.0}, "range_momentum=1.0")):
        with pytest.raises(ValueError, match=message):
            SDDense(features=4, activation_bits=8, **kwargs).init(jax.random.key(0), jnp.ones((2, 3)))
