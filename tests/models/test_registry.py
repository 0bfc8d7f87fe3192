"""Tests for sd_jax/models/registry.py: names, look-up and the errors it promises."""
import flax.linen as nn
import jax.numpy as jnp
import pytest

from sd_jax import models

EXPECTED_NAMES = [
    "lenet5", "mlp", "mobilenet_v2", "mobilenet_v2_imagenet",
    "resnet110", "resnet164", "resnet18", "resnet18_imagenet", "resnet20", "resnet32", "resnet34",
    "resnet34_imagenet", "resnet44", "resnet50", "resnet50_imagenet", "resnet56",
    "vgg11", "vgg16", "vgg19",
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
