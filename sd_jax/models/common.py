"""Pieces every model family shares: the layer-factory contract, batch norm, the stem and the head.

Layout. A model is a tree of Flax modules with stable names: blocks (`stage1_block0`), the `stem`
and the `head` are modules, and each holds its layers (`conv1`, `bn1`, `dense`, ...). Variable
paths are therefore nested dicts, `params['stage1_block0']['conv1']['kernel']`, that survive
`flax.traverse_util.flatten_dict(v, sep='/')`, `.npz` and Orbax alike. A layer's name is its
module path joined by '/' (`stage1_block0/conv1`, `stem/conv`, `head/dense`), the name SD rules
match and `sd_jax.nn.swap_layers` uses for any Flax model. Variables saved by sd_jax before the
modules nested hold those names as single keys at the top of each collection
(`params['stage1_block0/conv1']`); `upgrade_layout` nests them.

The factory contract. Each model has two fields, `conv` and `dense`, that build its conv and dense
layers; model code calls them with keyword arguments only:

    conv(features=, kernel_size=, strides=, padding=, use_bias=, feature_group_count=, name=, parent=)
    dense(features=, name=, parent=)

plus `dtype=` when the model's compute dtype is not float32. `name` is the layer's name inside its
block (`conv1`) and `parent` the block module, already bound, so a factory can decide per layer
(dense or SD) from the full name, `sd_jax.nn.rules.factory_layer_name(kwargs)`. Flax's own
`nn.Conv` / `nn.Dense` (and any module class) take these keywords as they are.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.nn.batch_norm import StoredBatchNorm

ModuleFactory = Callable[..., nn.Module]

BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1 in Flax's convention
BN_EPSILON = 1e-5


def factory_kwargs(dtype: Any) -> dict[str, Any]:
    """Extra keyword arguments for the layer factories: `dtype` only when it is not float32."""
    return {} if jnp.dtype(dtype) == jnp.float32 else {"dtype": dtype}


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style symmetric padding k // 2 on both spatial axes (Flax 'SAME' is asymmetric at stride 2)."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def layer(module: nn.Module, factory: ModuleFactory, name: str, **kwargs: Any) -> nn.Module:
    """The layer `name` inside `module`, built by `factory` (the contract above) at `module.dtype`."""
    return factory(**kwargs, name=name, parent=module, **factory_kwargs(module.dtype))


def conv(
    module: nn.Module,
    x: jnp.ndarray,
    *,
    features: int,
    kernel: int,
    stride: int,
    name: str,
    groups: int = 1,
) -> jnp.ndarray:
    """The square, bias-free conv layer `name` inside `module` (from its `conv` factory) applied to `x`."""
    return layer(
        module, module.conv, name, features=features, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=padding(kernel), use_bias=False, feature_group_count=groups,
    )(x)


def batch_norm(module: nn.Module, x: jnp.ndarray, *, train: bool, name: str, residual: jnp.ndarray | None = None,
               relu: bool = False, stored_bits: int | None = None) -> jnp.ndarray:
    """Batch norm `name` inside `module` with the statistics conventions of the reference (PyTorch
    defaults), then `+ residual` (if given) and ReLU (if `relu`). With `stored_bits` (4 or 8) the three
    are one `sd_jax.nn.batch_norm.StoredBatchNorm`, whose backward pass keeps its input at that width
    and the ReLU mask at one bit (same variables, same forward pass)."""
    if stored_bits:
        return StoredBatchNorm(stored_bits, BN_MOMENTUM, BN_EPSILON, module.dtype, relu, name=name)(
            x, residual, train=train)
    y = nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=module.dtype,
        name=name,
    )(x)
    y = y if residual is None else y + residual
    return nn.relu(y) if relu else y


def check_images(x: jnp.ndarray, model: str) -> None:
    """Raise a ValueError unless `x` is a rank-4 NHWC batch."""
    if x.ndim != 4:
        raise ValueError(
            f"model '{model}': input shape {tuple(x.shape)} is not (batch, height, width, channels); "
            "pass NHWC images"
        )


def check_layout(model: nn.Module) -> None:
    """Raise a ValueError if `model`'s variables are in the flat layout (a '/' in a top-level name)."""
    flat = sorted({name for collection in model.variables.values() for name in collection if "/" in name})
    if flat:
        raise ValueError(
            f"model '{type(model).__name__}': the variables hold layers named {flat[:3]} at the top level, the "
            "layout of sd_jax before blocks became nested modules; convert them with "
            "sd_jax.models.upgrade_layout(variables)"
        )


def upgrade_layout(variables: dict[str, Any]) -> dict[str, Any]:
    """Variables with flat layer names (`{'params': {'stage1_block0/conv1': {...}}}`) in the nested
    layout (`{'params': {'stage1_block0': {'conv1': {...}}}}`); nested variables come back equal.

    Raises ValueError when a flat name lands on a name the variables already hold.
    """
    upgraded: dict[str, Any] = {}
    for collection, layers in variables.items():
        nested: dict[str, Any] = {}
        for name, value in layers.items():
            *parents, leaf = name.split("/")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            if leaf in node:
                raise ValueError(f"upgrade_layout: {collection}/{name} lands on a name the variables already hold; "
                                 "pass variables in one layout, flat or nested")
            node[leaf] = value
        upgraded[collection] = nested
    return upgraded


def norm_activation(module: nn.Module, x: jnp.ndarray, *, train: bool, name: str) -> jnp.ndarray:
    """`module.activation` of batch norm `name`; with `module.stored_activation_bits` and ReLU, the fused
    `StoredBatchNorm` (any other activation keeps its input at full precision)."""
    if module.stored_activation_bits and module.activation is nn.relu:
        return batch_norm(module, x, train=train, name=name, relu=True, stored_bits=module.stored_activation_bits)
    return module.activation(batch_norm(module, x, train=train, name=name, stored_bits=module.stored_activation_bits))


class Stem(nn.Module):
    """`stem`: the square conv `conv`, then (when `batch_norm`) batch norm `bn` and `activation`."""

    features: int
    kernel: int
    stride: int
    conv: ModuleFactory
    dtype: Any
    batch_norm: bool = True
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
    stored_activation_bits: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = conv(self, x, features=self.features, kernel=self.kernel, stride=self.stride, name="conv")
        if not self.batch_norm:
            return x
        return norm_activation(self, x, train=train, name="bn")


class Head(nn.Module):
    """`head`: an optional 1×1 conv `conv` (`conv_features` > 0), batch norm `bn` and `activation`
    (when `batch_norm`), a global average pool over H, W of feature maps, optional dropout, then
    `dense`; logits come back as float32."""

    num_classes: int
    conv: ModuleFactory
    dense: ModuleFactory
    dtype: Any
    conv_features: int = 0
    batch_norm: bool = False
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
    dropout_rate: float = 0.0
    stored_activation_bits: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.conv_features:
            x = conv(self, x, features=self.conv_features, kernel=1, stride=1, name="conv")
        if self.batch_norm:
            x = norm_activation(self, x, train=train, name="bn")
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))  # (batch, channels)
        if self.dropout_rate > 0:
            x = nn.Dropout(rate=self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = layer(self, self.dense, "dense", features=self.num_classes)(x)
        return jnp.asarray(x, jnp.float32)
