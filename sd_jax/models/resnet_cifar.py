"""ResNets for 32×32 images with widths 16-32-64 (He et al. 2016, section 4.2 and "Identity Mappings").

- `CifarResNet`: depth 6n + 2 (ResNet-20/32/44/56/110), basic blocks, post-activation, and the
  parameter-free option-A shortcut (stride-2 subsampling plus zero channels), so the parameter counts
  are the paper's: 0.27 M, 0.46 M, 0.66 M, 0.85 M, 1.7 M.
- `CifarPreActResNet`: depth 9n + 2 (ResNet-164), pre-activation bottleneck blocks (expansion 4,
  1×1 projection shortcut where the shape changes), 1.7 M parameters.

Modules and layers: `stem` (`conv`, and `bn` in post-activation), `stage{s}_block{b}` (`conv{i}`,
`bn{i}`, `shortcut_conv`), `head` (`bn` in pre-activation, `dense`); stages count from 1, blocks from 0.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, Head, Stem, batch_norm, check_images, check_layout, conv
from sd_jax.models.resnet import ResidualBlock

WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR with basic blocks and option-A shortcuts."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32
    stored_activation_bits: int | None = None  # batch norm's and ReLU's, see `sd_jax.nn.batch_norm`

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CifarResNet: depth {self.depth} is not 6n + 2 with n >= 1; use 20, 32, 44, 56 or 110")
        check_images(x, f"resnet{self.depth}")
        check_layout(self)
        bits = self.stored_activation_bits
        x = Stem(WIDTHS[0], 3, 1, self.conv, self.dtype, stored_activation_bits=bits, name="stem")(
            jnp.asarray(x, self.dtype), train=train)
        for s, width in enumerate(WIDTHS, start=1):
            for b in range((self.depth - 2) // 6):
                stride = 2 if (s > 1 and b == 0) else 1
                x = ResidualBlock(width, stride, "basic", self.conv, self.dtype, shortcut="option_a",
                                  stored_activation_bits=bits, name=f"stage{s}_block{b}")(x, train=train)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: batch norm and ReLU before each of the 1×1, 3×3 (with the stride)
    and 1×1 to 4 × `features` convs; a 1×1 conv shortcut from the first activation where the shape changes."""

    features: int
    stride: int
    conv: ModuleFactory
    dtype: Any
    stored_activation_bits: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        out_features = 4 * self.features
        bits = self.stored_activation_bits
        y = batch_norm(self, x, train=train, name="bn1", relu=True, stored_bits=bits)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(self, y, features=out_features, kernel=1, stride=self.stride, name="shortcut_conv")
        for i, (features, kernel, stride) in enumerate(
                ((self.features, 1, 1), (self.features, 3, self.stride), (out_features, 1, 1)), start=1):
            if i > 1:
                y = batch_norm(self, y, train=train, name=f"bn{i}", relu=True, stored_bits=bits)
            y = conv(self, y, features=features, kernel=kernel, stride=stride, name=f"conv{i}")
        return y + x


class CifarPreActResNet(nn.Module):
    """Pre-activation ResNet-(9n+2) for CIFAR with bottleneck blocks (ResNet-164: n = 18)."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32
    stored_activation_bits: int | None = None  # batch norm's and ReLU's, see `sd_jax.nn.batch_norm`

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if (self.depth - 2) % 9 or self.depth < 11:
            raise ValueError(f"CifarPreActResNet: depth {self.depth} is not 9n + 2 with n >= 1; use e.g. 164")
        check_images(x, f"resnet{self.depth}")
        check_layout(self)
        x = Stem(WIDTHS[0], 3, 1, self.conv, self.dtype, batch_norm=False, name="stem")(
            jnp.asarray(x, self.dtype), train=train)
        for s, width in enumerate(WIDTHS, start=1):
            for b in range((self.depth - 2) // 9):
                stride = 2 if (s > 1 and b == 0) else 1
                x = PreActBottleneck(width, stride, self.conv, self.dtype, self.stored_activation_bits,
                                     name=f"stage{s}_block{b}")(x, train=train)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, batch_norm=True,
                    stored_activation_bits=self.stored_activation_bits, name="head")(x, train=train)
