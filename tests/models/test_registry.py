"""Tests for sd_jax/models/registry.py: names, look-up, the sd flag and the errors it promises."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import pytest

from sd_jax import models
from sd_jax.nn import SDRules

EXPECTED_NAMES = [
    "lenet5", "mlp", "mobilenet_v2", "mobilenet_v2_imagenet",
    "resnet110", "resnet164", "resnet18", "resnet18_imagenet", "resnet20", "resnet32", "resnet34",
    "resnet34_imagenet", "resnet44", "resnet50", "resnet50_imagenet", "resnet56",
    "transformer_lm", "vgg11", "vgg16", "vgg19",
]


def test_names_lists_every_model_sorted():
    assert models.names() == EXPECTED_NAMES


def test_get_returns_a_linen_module_with_the_requested_classes():
    model = models.get("resnet20", num_classes=7)
    assert isinstance(model, nn.Module)
    assert model.num_classes == 7


def test_get_passes_options_to_the_model():
    model = models.get("resnet18", num_classes=10, stem="imagenet", dtype=jnp.bfloat16)
    assert model.stem == "imagenet"
    assert model.dtype == jnp.bfloat16


def test_stored_activation_options_only_for_models_that_store_their_batch_norm_inputs():
    assert models.stored_activation_options("resnet20", 4) == {"stored_activation_bits": 4}
    assert models.stored_activation_options("resnet20", None) == {}
    assert models.stored_activation_options("mlp", 8) == {}
    assert models.get("resnet20", num_classes=10, **models.stored_activation_options("resnet20", 8)
                      ).stored_activation_bits == 8


def test_unknown_name_raises_value_error_listing_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20.*vgg19"):
        models.get("resnet21", num_classes=10)


def test_unknown_option_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'resnet20' has no option 'width'"):
        models.get("resnet20", num_classes=10, width=2)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_raises_value_error(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        models.get("resnet20", num_classes=num_classes)


def _collections(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _layers(collection):
    """The layer names ('stage1_block0/conv1') that hold variables of `collection`."""
    return {path.rsplit("/", 1)[0] for path in traverse_util.flatten_dict(collection, sep="/")}


def test_sd_flag_builds_sd_layers_where_the_method_applies():
    variables = _collections(models.get("resnet18_imagenet", num_classes=10, sd=True))
    sd_layers = _layers(variables["sd_coeff"])
    assert "head/dense" in sd_layers and "stage4_block1/conv2" in sd_layers and "stage2_block0/shortcut_conv" in sd_layers
    assert "stem/conv" not in sd_layers and "kernel" in variables["params"]["stem"]["conv"]  # the 7x7 stem stays dense


def test_sd_rules_pick_layers_and_options_by_name():
    rules = SDRules([("^stem/conv$", {"skip": True}), ("^head/dense$", {"skip": True})], mode="pow2")
    variables = _collections(models.get("resnet20", num_classes=10, sd=rules))
    assert len(_layers(variables["sd_coeff"])) == 18 and {"stem/conv", "head/dense"} <= _layers(variables["params"])


def test_sd_rule_matching_no_layer_raises_value_error():
    with pytest.raises(ValueError, match=r"\['stage4'\] match no layer"):
        models.get("resnet20", num_classes=10, sd=SDRules([("stage4", {})]))


def test_sd_with_layer_factories_or_a_bad_value_raises_value_error():
    with pytest.raises(ValueError, match="pass either sd= or the layer factories \\['conv'\\]"):
        models.get("resnet20", num_classes=10, sd=True, conv=nn.Conv)
    with pytest.raises(ValueError, match="sd must be True, False or an sd_jax.nn.SDRules"):
        models.get("resnet20", num_classes=10, sd="yes")


def test_sd_rule_forcing_a_kind_the_kernel_cannot_take_raises_value_error_naming_the_layer():
    model = models.get("resnet20", num_classes=10, sd=SDRules([("^stage1_block0/conv1$", {"kind": "depthwise"})]))
    with pytest.raises(ValueError, match="layer 'stage1_block0/conv1': a depthwise kernel has shape"):
        _collections(model)
