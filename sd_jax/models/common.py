"""Pieces every model family shares: the layer-factory contract, batch norm, the classifier head.

The factory contract. Each model has two fields, `conv` and `dense`, that build its conv and dense
layers; model code calls them with keyword arguments only:

    conv(features=, kernel_size=, strides=, padding=, use_bias=, feature_group_count=, name=)
    dense(features=, name=)

plus `dtype=` when the model's compute dtype is not float32. `name` is the layer's full, stable
name (`stage1_block0/conv1`, `stem/conv`, `head/dense`), unique within the model, so a factory can
decide per layer (dense or SD) from the name alone. Layers live at the top level of the model's
variable dict under exactly that name: `params['stage1_block0/conv1']['kernel']`. Flatten variable
dicts with tuple keys (`flax.traverse_util.flatten_dict(v)`), not with `sep='/'`, whose inverse
would split those names.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

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


def conv(
    factory: ModuleFactory,
    x: jnp.ndarray,
    *,
    features: int,
    kernel: int,
    stride: int,
    name: str,
    dtype: Any,
    groups: int = 1,
    use_bias: bool = False,
) -> jnp.ndarray:
    """Build a square conv layer through `factory` (the contract above) and apply it to `x`."""
    layer = factory(
        features=features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding(kernel),
        use_bias=use_bias,
        feature_group_count=groups,
        name=name,
        **factory_kwargs(dtype),
    )
    return layer(x)


def batch_norm(x: jnp.ndarray, *, train: bool, name: str, dtype: Any) -> jnp.ndarray:
    """Batch norm with the statistics conventions of the reference (PyTorch defaults)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )(x)


def check_images(x: jnp.ndarray, model: str) -> None:
    """Raise a ValueError unless `x` is a rank-4 NHWC batch."""
    if x.ndim != 4:
        raise ValueError(
            f"model '{model}': input shape {tuple(x.shape)} is not (batch, height, width, channels); "
            "pass NHWC images"
        )


def classifier_head(
    x: jnp.ndarray,
    *,
    num_classes: int,
    dense: ModuleFactory,
    dtype: Any,
    dropout_rate: float = 0.0,
    train: bool = False,
) -> jnp.ndarray:
    """Global average pool over H, W, optional dropout, then `head/dense`; logits come back as float32."""
    x = jnp.mean(x, axis=(1, 2))  # (batch, channels)
    if dropout_rate > 0:
        x = nn.Dropout(rate=dropout_rate, deterministic=not train, name="head/dropout")(x)
    x = dense(features=num_classes, name="head/dense", **factory_kwargs(dtype))(x)
    return jnp.asarray(x, jnp.float32)
