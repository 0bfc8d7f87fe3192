"""Models by name: `get("resnet20", num_classes=10)`.

`get(name, sd=True)` builds the model in SD form (every conv and dense layer the method covers is an
SDConv / SDDense); `get(name, sd=SDRules(rules, **defaults))` picks the SD layers and their options
by name patterns (`sd_jax.nn.rules`). The zoo swaps layers through its `conv` / `dense` factories.

Naming: a name without suffix is the CIFAR (32×32) form; `_imagenet` is the ImageNet form (7×7
stride-2 stem and max-pool for ResNets, stride-2 stem for MobileNetV2). Adding a model is one module
plus one line in `_BUILDERS`.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models import mobilenet_v2, resnet, resnet_cifar, small, transformer, vgg
from sd_jax.nn.rules import SDRules, factory_layer_name

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    # CIFAR ResNets, widths 16-32-64 (He et al. 2016).
    "resnet20": functools.partial(resnet_cifar.CifarResNet, depth=20),
    "resnet32": functools.partial(resnet_cifar.CifarResNet, depth=32),
    "resnet44": functools.partial(resnet_cifar.CifarResNet, depth=44),
    "resnet56": functools.partial(resnet_cifar.CifarResNet, depth=56),
    "resnet110": functools.partial(resnet_cifar.CifarResNet, depth=110),
    "resnet164": functools.partial(resnet_cifar.CifarPreActResNet, depth=164),
    # ResNets with widths 64-512.
    "resnet18": functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block="basic", stem="cifar"),
    "resnet34": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block="basic", stem="cifar"),
    "resnet50": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="cifar"),
    "resnet18_imagenet": functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block="basic", stem="imagenet"),
    "resnet34_imagenet": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block="basic", stem="imagenet"),
    "resnet50_imagenet": functools.partial(
        resnet.ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="imagenet"),
    # VGG with batch norm, CIFAR form.
    "vgg11": functools.partial(vgg.VGG, depth=11),
    "vgg16": functools.partial(vgg.VGG, depth=16),
    "vgg19": functools.partial(vgg.VGG, depth=19),
    # MobileNetV2.
    "mobilenet_v2": functools.partial(mobilenet_v2.MobileNetV2, stem="cifar"),
    "mobilenet_v2_imagenet": functools.partial(mobilenet_v2.MobileNetV2, stem="imagenet"),
    # Small networks for 28×28 / 32×32 images.
    "lenet5": small.LeNet5,
    "mlp": small.MLP,
    # A small decoder-only Transformer language model (token ids in, next-token logits out).
    "transformer_lm": transformer.TransformerLM,
}

_NOT_OPTIONS = ("parent", "name")
# Every image model of the zoo accepts this input (a model with a PROBE_SHAPE takes that instead); layer
# names do not depend on the input size.
_PROBE_INPUT = (1, 32, 32, 3)


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_BUILDERS)


def probe_shape(model: nn.Module) -> tuple[int, ...]:
    """A small input shape (batch first) `model` accepts: (1, 32, 32, 3) images, or its own `PROBE_SHAPE`
    (the Transformer's (1, 8) tokens)."""
    return tuple(getattr(model, "PROBE_SHAPE", _PROBE_INPUT))


def layer_names(model: nn.Module) -> list[str]:
    """Names of the conv and dense layers of a zoo model (`stage1_block0/conv1`), in build order (traced
    abstractly)."""
    built: list[str] = []

    def recording(factory):
        def build(**kwargs):
            built.append(factory_layer_name(kwargs))
            return factory(**kwargs)
        return build

    probe = model.clone(conv=recording(model.conv), dense=recording(model.dense))
    jax.eval_shape(lambda: probe.init(jax.random.key(0), jnp.zeros(probe_shape(model)), train=False))
    return built


def options(name: str) -> set[str]:
    """The fields `get(name, **kwargs)` accepts as keyword arguments (`num_classes` among them)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    builder = _BUILDERS[name]
    cls = builder.func if isinstance(builder, functools.partial) else builder
    return {f.name for f in dataclasses.fields(cls)} - set(_NOT_OPTIONS)


def stored_activation_options(name: str, bits: int | None) -> dict[str, int]:
    """{"stored_activation_bits": bits} where model `name` stores its batch norms' inputs and ReLU masks
    at low precision itself (ResNets, VGG: `sd_jax.nn.batch_norm`), else {} (its conv and dense layers
    take the option from their factories or rules)."""
    return {"stored_activation_bits": bits} if bits and "stored_activation_bits" in options(name) else {}


def get(name: str, *, num_classes: int, sd: bool | SDRules = False, **kwargs: Any) -> nn.Module:
    """The model registered as `name` with `num_classes` outputs; `kwargs` set or override its fields.

    `sd`: False for the dense model, True for SD layers wherever the method applies, or an `SDRules`
    that selects the SD layers and their options (a rule that matches no layer raises ValueError).
    Common fields: `conv` and `dense` (layer factories, see `sd_jax.models.common`; not together with
    `sd`), `dtype` (compute dtype; parameters stay float32). Raises ValueError for an unknown name or
    option.
    """
    known = options(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model {name!r}: num_classes must be a positive int, got {num_classes!r}")
    builder = _BUILDERS[name]
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are {', '.join(sorted(known - {'num_classes'}))}")
    if sd is False:
        return builder(num_classes=num_classes, **kwargs)
    if not (sd is True or isinstance(sd, SDRules)):
        raise ValueError(f"model {name!r}: sd must be True, False or an sd_jax.nn.SDRules, got {sd!r}")
    factories = sorted({"conv", "dense"} & set(kwargs))
    if factories:
        raise ValueError(f"model {name!r}: pass either sd= or the layer factories {factories}, not both")
    rules = SDRules() if sd is True else sd
    if rules.rules:
        rules.check_matches(layer_names(builder(num_classes=num_classes, **kwargs)))
    return builder(num_classes=num_classes, conv=rules.conv_factory(), dense=rules.dense_factory(), **kwargs)
