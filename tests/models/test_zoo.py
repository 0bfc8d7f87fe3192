"""Tests for the model families (sd_jax/models/{resnet_cifar,resnet,vgg,mobilenet_v2,small}.py).

Every registered model: parameter count against a published figure, forward pass in train and eval
mode on a tiny batch, the conv/dense factory contract. Parameter counts use `jax.eval_shape`, so
no weights are materialised; forward passes use `sd_jax.models.synthetic` variables rather than running
every initialiser, which on CPU compiles per shape.
"""
import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn.rules import factory_layer_name

# name -> (published figure, source). Counts are all leaves of the `params` collection (conv and
# dense kernels, dense biases, batch-norm scales and offsets; running statistics are in
# `batch_stats`), for 10 classes unless the name ends in `_imagenet` (1000 classes).
# A figure written "1.7M" is rounded; the tolerance is 1 % or half a unit of its last digit,
# whichever is larger. Figures marked "derived" are computed from an exactly published count of a
# sibling network, the derivation given; they check the architecture, not a measurement.
PUBLISHED = {
    # He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6 (CIFAR-10).
    "resnet20": ("0.27M", "He et al. 2016, Table 6"),
    "resnet32": ("0.46M", "He et al. 2016, Table 6"),
    "resnet44": ("0.66M", "He et al. 2016, Table 6"),
    "resnet56": ("0.85M", "He et al. 2016, Table 6"),
    # 1,727,962 is 1.6 % above 1.7M: within the rounding of the published figure, not within 1 %.
    "resnet110": ("1.7M", "He et al. 2016, Table 6"),
    # He et al. 2016, "Identity Mappings in Deep Residual Networks", CIFAR results (pre-activation).
    "resnet164": ("1.7M", "He et al. 2016b (Identity Mappings), CIFAR table"),
    # torchvision weight metadata `num_params` (ResNet18/34/50_Weights.IMAGENET1K_V1,
    # MobileNet_V2_Weights.IMAGENET1K_V1).
    "resnet18_imagenet": ("11,689,512", "torchvision resnet18"),
    "resnet34_imagenet": ("21,797,672", "torchvision resnet34"),
    "resnet50_imagenet": ("25,557,032", "torchvision resnet50"),
    "mobilenet_v2_imagenet": ("3,504,872", "torchvision mobilenet_v2"),
    # Derived: torchvision count - 7x7 stem (9,408) + 3x3 stem (1,728) - 1000-class head + 10-class
    # head (ResNet-18/34: 513,000 -> 5,130; ResNet-50: 2,049,000 -> 20,490).
    "resnet18": ("11,173,962", "derived from torchvision resnet18; the usual CIFAR ResNet-18 figure 11.17M"),
    "resnet34": ("21,282,122", "derived from torchvision resnet34"),
    "resnet50": ("23,520,842", "derived from torchvision resnet50"),
    # Derived: torchvision mobilenet_v2 - 1,281,000 (1000-class head) + 12,810 (10-class head).
    "mobilenet_v2": ("2,236,682", "derived from torchvision mobilenet_v2 (strides do not change counts)"),
    # Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", Table 1.
    "vgg16": ("14.7M", "Frankle et al. 2020, Table 1 (CIFAR-10 VGG-16)"),
    # Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming",
    # Table 1, CIFAR-10 VGGNet (VGG-19 with batch norm and one dense layer).
    "vgg19": ("20.04M", "Liu et al. 2017 (Network Slimming), Table 1"),
    # Derived: no published figure for this exact form was found; convs of configuration A
    # (9,217,728) + batch norm (5,504) + 512x10 head (5,130).
    "vgg11": ("9,228,362", "derived from VGG configuration A"),
    # LeNet-5 on CIFAR-10 (32x32x3): table of blog.51cto.com/u_15786578/5667479 ("LeNet ... 62006");
    # LeCun et al. 1998 give "about 60,000" for the original (1 channel, partial C3 connectivity).
    "lenet5": ("62,006", "LeNet-5 on 32x32x3, blog.51cto.com/u_15786578/5667479"),
    # Frankle & Carbin 2019, "The Lottery Ticket Hypothesis", Figure 2: LeNet-300-100, 266K weights.
    "mlp": ("266K", "Frankle & Carbin 2019, Figure 2"),
    # Derived: 4 pre-LN blocks of width 128 (4 projections 128x128 + MLP 128x512x128, biases, two layer
    # norms: 198,272 each), one-hot embedding 10x128 + bias, final norm 256, head 128x10 + 10.
    "transformer_lm": ("796,042", "derived from the block sizes (no published model)"),
}

# name -> (input shape used for counting, tiny input shape for the forward pass).
INPUTS = {name: ((1, 32, 32, 3), (2, 8, 8, 3)) for name in models.names()}
INPUTS.update({
    "vgg11": ((1, 32, 32, 3), (2, 32, 32, 3)),  # five 2x2 max-pools need 32x32
    "vgg16": ((1, 32, 32, 3), (2, 32, 32, 3)),
    "vgg19": ((1, 32, 32, 3), (2, 32, 32, 3)),
    "lenet5": ((1, 32, 32, 3), (2, 28, 28, 1)),  # MNIST-sized input, padded to 32x32 inside
    "mlp": ((1, 28, 28, 1), (2, 28, 28, 1)),
    "resnet18_imagenet": ((1, 64, 64, 3), (2, 32, 32, 3)),
    "resnet34_imagenet": ((1, 64, 64, 3), (2, 32, 32, 3)),
    "resnet50_imagenet": ((1, 64, 64, 3), (2, 32, 32, 3)),
    "mobilenet_v2_imagenet": ((1, 64, 64, 3), (2, 32, 32, 3)),
    "transformer_lm": ((1, 16), (2, 8)),  # token ids
})

# Forward passes that take more than a few seconds on a 2-core CPU, and deeper or wider siblings of a
# family the fast set already runs (resnet20, vgg11, mobilenet_v2); tests/models/test_sd_zoo.py runs
# the SD form of resnet20 in train and eval mode too.
SLOW_FORWARD = {"resnet110", "resnet164", "resnet34", "resnet50", "resnet34_imagenet", "resnet50_imagenet",
                "resnet32", "resnet44", "resnet56", "vgg16", "vgg19", "mobilenet_v2_imagenet", "transformer_lm"}

# Models whose real `init` is cheap enough for the fast set.
INIT_FAST = ["lenet5", "mlp"]

FACTORY_KWARGS = {"features", "kernel_size", "strides", "padding", "use_bias", "feature_group_count",
                  "kernel_dilation", "name", "parent"}


def _num_classes(name):
    return 1000 if name.endswith("_imagenet") else 10


def _abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _parse_figure(text):
    """'1.7M' -> (1.7e6, half unit 5e4); '11,689,512' -> (11689512, 0.5)."""
    match = re.fullmatch(r"([\d.]+)([KM])", text)
    if match is None:
        return float(text.replace(",", "")), 0.5
    digits, unit = match.groups()
    scale = {"K": 1e3, "M": 1e6}[unit]
    decimals = len(digits.partition(".")[2])
    return float(digits) * scale, 0.5 * 10.0 ** -decimals * scale


def test_every_registered_model_has_a_published_figure():
    assert sorted(PUBLISHED) == models.names()


@pytest.mark.parametrize("name", models.names())
def test_parameter_count_matches_published_figure(name):
    model = models.get(name, num_classes=_num_classes(name))
    count = _count(_abstract_variables(model, INPUTS[name][0])["params"])
    figure, source = PUBLISHED[name]
    reference, half_unit = _parse_figure(figure)
    tolerance = max(0.01 * reference, half_unit)
    assert abs(count - reference) <= tolerance, f"{name}: {count:,} parameters, {source}: {figure}"


def _check_forward(model, variables, x, num_classes):
    @jax.jit
    def train_and_eval(variables, x):
        train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return train_logits, updates, model.apply(variables, x, train=False)

    train_logits, updates, eval_logits = train_and_eval(variables, x)
    expected = (*x.shape, num_classes) if x.ndim == 2 else (x.shape[0], num_classes)  # per token, or per image
    for logits in (train_logits, eval_logits):
        assert logits.shape == expected and logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
    if "batch_stats" in variables:  # train mode moved the running statistics towards the batch's
        before, after = variables["batch_stats"], updates["batch_stats"]
        assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
        assert any(not np.allclose(b, a) for b, a in zip(jax.tree_util.tree_leaves(before),
                                                          jax.tree_util.tree_leaves(after)))
    else:
        assert not updates.get("batch_stats")


def _forward(name):
    model = models.get(name, num_classes=_num_classes(name))
    x = jax.random.normal(jax.random.key(1), INPUTS[name][1])
    variables = synthetic_variables(model, x)
    _check_forward(model, variables, x, _num_classes(name))


@pytest.mark.parametrize("name", sorted(set(models.names()) - SLOW_FORWARD))
def test_forward_train_and_eval(name):
    _forward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_FORWARD))
def test_forward_train_and_eval_large(name):
    _forward(name)


def _init_and_forward(name):
    model = models.get(name, num_classes=_num_classes(name))
    x = jax.random.normal(jax.random.key(1), INPUTS[name][1])
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
               for leaf in jax.tree_util.tree_leaves(variables))
    _check_forward(model, variables, x, _num_classes(name))


@pytest.mark.parametrize("name", INIT_FAST)
def test_init_and_forward(name):
    _init_and_forward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(models.names()) - set(INIT_FAST)))
def test_init_and_forward_large(name):
    _init_and_forward(name)


def _recording(factory, record):
    def build(**kwargs):
        record.append(kwargs)
        return factory(**kwargs)
    return build


@pytest.mark.parametrize("name", models.names())
def test_layers_are_built_through_the_factories_with_unique_names(name):
    convs, denses = [], []
    model = models.get(name, num_classes=_num_classes(name),
                       conv=_recording(nn.Conv, convs), dense=_recording(nn.Dense, denses))
    params = _abstract_variables(model, INPUTS[name][0])["params"]

    built = [factory_layer_name(kwargs) for kwargs in convs + denses]
    assert len(built) == len(set(built)), "a layer name was built twice"
    kernels = [name for name in traverse_util.flatten_dict(params, sep="/") if name.endswith("/kernel")]
    assert len(built) == len(kernels)
    assert set(built) == {name.removesuffix("/kernel") for name in kernels}
    for kwargs in convs + denses:
        assert set(kwargs) <= FACTORY_KWARGS, f"{kwargs['name']}: unexpected {set(kwargs) - FACTORY_KWARGS}"
    assert all(set(kwargs) == {"features", "name", "parent"} for kwargs in denses)
    assert "head/dense" in built


def _layers(collection):
    return {name.rsplit("/", 1)[0] for name in traverse_util.flatten_dict(collection, sep="/")}


def test_blocks_are_modules_holding_their_layers():
    model = models.get("resnet20", num_classes=10)
    params = _abstract_variables(model, (1, 32, 32, 3))["params"]
    assert {"stem", "stage1_block0", "stage3_block2", "head"} <= set(params)
    assert set(params["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert {"stem/conv", "stem/bn", "stage1_block0/conv1", "stage3_block2/bn2", "head/dense"} <= _layers(params)
    assert all("/" not in key for path in traverse_util.flatten_dict(params) for key in path)


ROUND_TRIP = [("resnet20", False), ("resnet20", True), ("resnet18_imagenet", False), ("resnet164", False),
              ("mobilenet_v2", True), ("vgg11", False), ("lenet5", True), ("mlp", False)]


@pytest.mark.parametrize("name,sd", ROUND_TRIP)
def test_variables_round_trip_through_slash_joined_npz(name, sd, tmp_path):
    model = models.get(name, num_classes=_num_classes(name), sd=sd)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = synthetic_variables(model, x)
    flat = traverse_util.flatten_dict(variables, sep="/")
    np.savez(tmp_path / "variables.npz", **{key: np.asarray(value) for key, value in flat.items()})
    with np.load(tmp_path / "variables.npz") as stored:
        loaded = traverse_util.unflatten_dict({key: stored[key] for key in stored.files}, sep="/")
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    np.testing.assert_array_equal(model.apply(loaded, x, train=False), model.apply(variables, x, train=False))


def test_upgrade_layout_nests_flat_layer_names():
    model = models.get("resnet20", num_classes=10, sd=True)
    x = jnp.zeros((1, 32, 32, 3))
    variables = synthetic_variables(model, x)
    old = {collection: {} for collection in variables}
    for (collection, *layer, leaf), value in traverse_util.flatten_dict(variables).items():
        old[collection].setdefault("/".join(layer), {})[leaf] = value
    assert "stage1_block0/conv1" in old["sd_coeff"] and "stem/bn" in old["batch_stats"]
    upgraded = models.upgrade_layout(old)
    assert traverse_util.flatten_dict(upgraded) == traverse_util.flatten_dict(variables)
    assert traverse_util.flatten_dict(models.upgrade_layout(variables)) == traverse_util.flatten_dict(variables)
    np.testing.assert_array_equal(model.apply(upgraded, x, train=False), model.apply(variables, x, train=False))
    with pytest.raises(ValueError, match=r"named \[.*'stage1_block0/bn1'.*sd_jax.models.upgrade_layout\(variables\)"):
        model.apply(old, x, train=False)


def test_upgrade_layout_refuses_a_name_held_in_both_layouts():
    variables = {"params": {"stem": {"conv": {"kernel": np.zeros(1)}}, "stem/conv": {"kernel": np.ones(1)}}}
    with pytest.raises(ValueError, match="params/stem/conv lands on a name the variables already hold"):
        models.upgrade_layout(variables)


def test_depthwise_convs_use_one_group_per_channel():
    convs = []
    model = models.get("mobilenet_v2", num_classes=10, conv=_recording(nn.Conv, convs))
    params = _abstract_variables(model, (1, 32, 32, 3))["params"]
    depthwise = [kwargs for kwargs in convs if kwargs["name"] == "depthwise_conv"]
    assert len(depthwise) == 17
    for kwargs in depthwise:
        assert kwargs["feature_group_count"] == kwargs["features"]
        block = kwargs["parent"].name
        assert params[block]["depthwise_conv"]["kernel"].shape == (3, 3, 1, kwargs["features"])


def test_mobilenet_v2_smartdeal_reference_variant():
    # Derived count: mobilenet_v2 (2,236,682) + the reference's extra layers: expand conv at t = 1
    # (32x32 + batch norm 64) and 1x1 shortcuts 32->16, 16->24, 64->96, 160->320 with batch norm
    # (544 + 432 + 6,336 + 51,840) = 2,296,922 (kuangliu/pytorch-cifar MobileNetV2, 10 classes).
    model = models.get("mobilenet_v2", num_classes=10, smartdeal_reference=True)
    params = _abstract_variables(model, (1, 32, 32, 3))["params"]
    assert _count(params) == 2_296_922
    assert "expand_conv" in params["stage1_block0"] and "shortcut_conv" in params["stage7_block0"]


def test_compute_dtype_keeps_parameters_float32():
    convs, denses = [], []
    model = models.get("resnet20", num_classes=10, dtype=jnp.bfloat16,
                       conv=_recording(nn.Conv, convs), dense=_recording(nn.Dense, denses))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    abstract = _abstract_variables(model, x.shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract))
    assert convs and all(kwargs["dtype"] == jnp.bfloat16 for kwargs in convs + denses)
    _check_forward(model, synthetic_variables(model, x), x, 10)


def test_resnet_stems_differ_in_resolution():
    x = jnp.zeros((1, 64, 64, 3))
    for stem, size in (("cifar", 64), ("imagenet", 16)):
        model = models.get("resnet18", num_classes=10, stem=stem)
        _, state = jax.eval_shape(
            lambda: model.init_with_output(jax.random.key(0), x, train=False,
                                           capture_intermediates=lambda m, _: m.path == ("stage1_block0", "bn1")))
        (out,) = state["intermediates"]["stage1_block0"]["bn1"]["__call__"]
        assert out.shape[1:3] == (size, size)


def test_non_image_input_raises_value_error():
    model = models.get("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="is not \\(batch, height, width, channels\\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 32 * 32 * 3)), train=False)


def test_vgg_input_smaller_than_32_raises_value_error():
    model = models.get("vgg11", num_classes=10)
    with pytest.raises(ValueError, match="smaller than 32×32"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


@pytest.mark.parametrize("name,option,value", [("resnet18", "stem", "tiny"), ("mobilenet_v2", "stem", "tiny")])
def test_unknown_stem_raises_value_error(name, option, value):
    model = models.get(name, num_classes=10, **{option: value})
    with pytest.raises(ValueError, match="stem 'tiny' is not one of"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_an_sd_style_factory_can_choose_layers_by_name():
    # A factory that decides per layer from the full name, as SDRules.conv_factory does.
    zero_stem = []

    def conv(**kwargs):
        if factory_layer_name(kwargs) == "stem/conv":
            zero_stem.append(factory_layer_name(kwargs))
            return nn.Conv(kernel_init=nn.initializers.zeros, **kwargs)
        return nn.Conv(**kwargs)

    model = models.get("resnet20", num_classes=10, conv=conv)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.ones((1, 8, 8, 3)))["params"]
    assert zero_stem == ["stem/conv"]
    assert not np.any(params["stem"]["conv"]["kernel"]) and np.any(params["stage1_block0"]["conv1"]["kernel"])
