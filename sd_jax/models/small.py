"""Small networks for 28×28 or 32×32 images: LeNet-5 and a multi-layer perceptron.

- `LeNet5` (LeCun et al. 1998) in its modern form: full C3 connectivity, ReLU, max-pooling, dense
  output. Images smaller than 32×32 (MNIST's 28×28) are zero-padded, centred, to 32×32 as in the
  paper, so the flattened features are always 5×5×16 = 400 for 28×28 and 32×32 inputs.
  Modules and layers: `features` (`conv1`, `conv2`), `classifier` (`fc1`, `fc2`), `head` (`dense`).
- `MLP`: flatten, ReLU dense layers of widths `hidden`, dense output; the default (300, 100) is
  LeNet-300-100. Modules and layers: `hidden{i}` (`dense`; from 1), `head` (`dense`).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import Head, ModuleFactory, check_images, check_layout, layer

LENET_INPUT_SIZE = 32


class LeNetFeatures(nn.Module):
    """Two 5×5 valid convs with bias (`conv1`: 6, `conv2`: 16 features), each with ReLU and a 2×2 max-pool."""

    conv: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, features in enumerate((6, 16), start=1):
            x = layer(self, self.conv, f"conv{i}", features=features, kernel_size=(5, 5), strides=(1, 1),
                      padding=((0, 0), (0, 0)), use_bias=True, feature_group_count=1)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return x


class ReluDenses(nn.Module):
    """Dense layers named `names`, of widths `widths`, each followed by ReLU."""

    widths: Sequence[int]
    names: Sequence[str]
    dense: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for name, features in zip(self.names, self.widths):
            x = nn.relu(layer(self, self.dense, name, features=features)(x))
        return x


class LeNet5(nn.Module):
    """LeNet-5: two 5×5 conv + 2×2 max-pool stages, dense 120 and 84, dense output."""

    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_images(x, "lenet5")
        check_layout(self)
        x = jnp.asarray(x, self.dtype)
        pad_h = max(LENET_INPUT_SIZE - x.shape[1], 0)
        pad_w = max(LENET_INPUT_SIZE - x.shape[2], 0)
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        x = LeNetFeatures(self.conv, self.dtype, name="features")(x)
        x = x.reshape(x.shape[0], -1)  # (batch, 5 * 5 * 16) for 32×32 inputs
        x = ReluDenses((120, 84), ("fc1", "fc2"), self.dense, self.dtype, name="classifier")(x)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)


class MLP(nn.Module):
    """Multi-layer perceptron on flattened images (default: LeNet-300-100)."""

    num_classes: int
    hidden: Sequence[int] = (300, 100)
    dense: ModuleFactory = nn.Dense
    conv: ModuleFactory = nn.Conv  # unused; kept so every model takes the same factories
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_images(x, "mlp")
        check_layout(self)
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)  # (batch, height * width * channels)
        for i, features in enumerate(self.hidden, start=1):
            x = ReluDenses((features,), ("dense",), self.dense, self.dtype, name=f"hidden{i}")(x)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)
