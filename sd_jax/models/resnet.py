"""ResNet-18/34/50 (He et al. 2016), widths 64-128-256-512, with a CIFAR or an ImageNet stem.

- stem 'imagenet': 7×7 conv, stride 2, then 3×3 max-pool, stride 2 (torchvision's `resnet18` etc.;
  ResNet-50 is "v1.5", stride on the 3×3 conv of the bottleneck).
- stem 'cifar': 3×3 conv, stride 1, no max-pool (the CIFAR ResNet-18 of the SmartDeal reference code,
  itself kuangliu/pytorch-cifar's).
Shortcuts are 1×1 conv + batch norm where the shape changes, identity elsewhere.

Modules and layers: `stem` (`conv`, `bn`), `stage{s}_block{b}` (`conv{i}`, `bn{i}`, `shortcut_conv`,
`shortcut_bn`), `head` (`dense`); stages count from 1, blocks from 0. `BasicBlock` also serves the
CIFAR ResNets of `resnet_cifar` with their parameter-free option-A shortcut.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, Head, Stem, batch_norm, check_images, check_layout, conv

STEMS = ("cifar", "imagenet")
BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("projection", "option_a")
WIDTHS = (64, 128, 256, 512)


def option_a_shortcut(x: jnp.ndarray, features: int, stride: int) -> jnp.ndarray:
    """Identity shortcut that subsamples by `stride` and zero-pads channels equally on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def _shortcut(block: nn.Module, x: jnp.ndarray, features: int, *, train: bool) -> jnp.ndarray:
    """`x` as the block's residual: identity where the shape holds, else the block's `shortcut` kind."""
    if block.stride == 1 and x.shape[-1] == features:
        return x
    if block.shortcut == "option_a":
        return option_a_shortcut(x, features, block.stride)
    y = conv(block, x, features=features, kernel=1, stride=block.stride, name="shortcut_conv")
    return batch_norm(block, y, train=train, name="shortcut_bn")


class BasicBlock(nn.Module):
    """Two 3×3 convs with batch norm (`conv1`, `bn1`, `conv2`, `bn2`) and a residual connection;
    `shortcut` 'projection' (1×1 conv + batch norm where the shape changes) or 'option_a'."""

    features: int
    stride: int
    conv: ModuleFactory
    dtype: Any
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        residual = _shortcut(self, x, self.features, train=train)
        y = conv(self, x, features=self.features, kernel=3, stride=self.stride, name="conv1")
        y = nn.relu(batch_norm(self, y, train=train, name="bn1"))
        y = conv(self, y, features=self.features, kernel=3, stride=1, name="conv2")
        y = batch_norm(self, y, train=train, name="bn2")
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1×1, 3×3 (with the stride), 1×1 to 4 × `features` convs with batch norm and a projection shortcut."""

    features: int
    stride: int
    conv: ModuleFactory
    dtype: Any
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        out_features = 4 * self.features
        residual = _shortcut(self, x, out_features, train=train)
        y = x
        for i, (features, kernel, stride) in enumerate(
                ((self.features, 1, 1), (self.features, 3, self.stride), (out_features, 1, 1)), start=1):
            if i > 1:
                y = nn.relu(y)
            y = conv(self, y, features=features, kernel=kernel, stride=stride, name=f"conv{i}")
            y = batch_norm(self, y, train=train, name=f"bn{i}")
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet with `stage_sizes` blocks per stage of kind `block` ('basic' or 'bottleneck')."""

    stage_sizes: Sequence[int]
    block: str
    num_classes: int
    stem: str = "cifar"
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: stem {self.stem!r} is not one of {STEMS}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: block {self.block!r} is not one of {BLOCKS}")
        check_images(x, "ResNet")
        check_layout(self)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = Stem(64, 7, 2, self.conv, self.dtype, name="stem")(x, train=train)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = Stem(64, 3, 1, self.conv, self.dtype, name="stem")(x, train=train)
        block = BasicBlock if self.block == "basic" else Bottleneck
        for s, (width, num_blocks) in enumerate(zip(WIDTHS, self.stage_sizes), start=1):
            for b in range(num_blocks):
                stride = 2 if (s > 1 and b == 0) else 1
                x = block(width, stride, self.conv, self.dtype, name=f"stage{s}_block{b}")(x, train=train)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)
