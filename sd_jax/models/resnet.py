"""ResNet-18/34/50 (He et al. 2016), widths 64-128-256-512, with a CIFAR or an ImageNet stem.

- stem 'imagenet': 7×7 conv, stride 2, then 3×3 max-pool, stride 2 (torchvision's `resnet18` etc.;
  ResNet-50 is "v1.5", stride on the 3×3 conv of the bottleneck).
- stem 'cifar': 3×3 conv, stride 1, no max-pool (the CIFAR ResNet-18 of the SmartDeal reference code,
  itself kuangliu/pytorch-cifar's).
Shortcuts are 1×1 conv + batch norm where the shape changes, identity elsewhere.

Modules and layers: `stem` (`conv`, `bn`), `stage{s}_block{b}` (`conv{i}`, `bn{i}`, `shortcut_conv`,
`shortcut_bn`), `head` (`dense`); stages count from 1, blocks from 0. `ResidualBlock` also serves the
CIFAR ResNets of `resnet_cifar` with their parameter-free option-A shortcut.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, Head, Stem, batch_norm, check_images, check_layout, conv

STEMS = ("cifar", "imagenet")
BLOCKS = ("basic", "bottleneck")
WIDTHS = (64, 128, 256, 512)


def option_a_shortcut(x: jnp.ndarray, features: int, stride: int) -> jnp.ndarray:
    """Identity shortcut that subsamples by `stride` and zero-pads channels equally on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class ResidualBlock(nn.Module):
    """Post-activation residual block of kind 'basic' (3×3 convs `conv1`, `conv2`) or 'bottleneck'
    (1×1, 3×3, 1×1 to 4 × `features`: `conv1` to `conv3`), the stride on the first 3×3 conv, each conv
    followed by batch norm `bn{i}`, ReLU between them and after the sum with the shortcut: identity
    where the shape holds, else `shortcut` 'projection' (`shortcut_conv`, `shortcut_bn`) or 'option_a'."""

    features: int
    stride: int
    kind: str
    conv: ModuleFactory
    dtype: Any
    shortcut: str = "projection"
    stored_activation_bits: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        f = self.features
        convs = (((f, 3, self.stride), (f, 3, 1)) if self.kind == "basic"
                 else ((f, 1, 1), (f, 3, self.stride), (4 * f, 1, 1)))  # (features, kernel, stride)
        out_features = convs[-1][0]
        bits = self.stored_activation_bits
        residual = x
        if self.stride != 1 or x.shape[-1] != out_features:
            if self.shortcut == "option_a":
                residual = option_a_shortcut(x, out_features, self.stride)
            else:
                residual = conv(self, x, features=out_features, kernel=1, stride=self.stride, name="shortcut_conv")
                residual = batch_norm(self, residual, train=train, name="shortcut_bn", stored_bits=bits)
        y = x
        for i, (features, kernel, stride) in enumerate(convs, start=1):
            y = conv(self, y, features=features, kernel=kernel, stride=stride, name=f"conv{i}")
            last = i == len(convs)
            y = batch_norm(self, y, train=train, name=f"bn{i}", residual=residual if last else None, relu=True,
                           stored_bits=bits)
        return y


class ResNet(nn.Module):
    """ResNet with `stage_sizes` blocks per stage of kind `block` ('basic' or 'bottleneck')."""

    stage_sizes: Sequence[int]
    block: str
    num_classes: int
    stem: str = "cifar"
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32
    stored_activation_bits: int | None = None  # batch norm's and ReLU's, see `sd_jax.nn.batch_norm`

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: stem {self.stem!r} is not one of {STEMS}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: block {self.block!r} is not one of {BLOCKS}")
        check_images(x, "ResNet")
        check_layout(self)
        x = jnp.asarray(x, self.dtype)
        bits = self.stored_activation_bits
        if self.stem == "imagenet":
            x = Stem(64, 7, 2, self.conv, self.dtype, stored_activation_bits=bits, name="stem")(x, train=train)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = Stem(64, 3, 1, self.conv, self.dtype, stored_activation_bits=bits, name="stem")(x, train=train)
        for s, (width, num_blocks) in enumerate(zip(WIDTHS, self.stage_sizes), start=1):
            for b in range(num_blocks):
                stride = 2 if (s > 1 and b == 0) else 1
                x = ResidualBlock(width, stride, self.block, self.conv, self.dtype, stored_activation_bits=bits,
                                  name=f"stage{s}_block{b}")(x, train=train)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)
