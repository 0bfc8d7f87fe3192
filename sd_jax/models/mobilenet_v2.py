"""MobileNetV2 (Sandler et al. 2018), width 1.0, for ImageNet or CIFAR.

- stem 'imagenet': torchvision's `mobilenet_v2` layer for layer (3,504,872 parameters with 1000
  classes): 3×3 stride-2 stem, inverted residual blocks, 1×1 conv to 1280, ReLU6.
- stem 'cifar': the same blocks with the stem conv and the first 24-channel stage at stride 1 (so a
  32×32 image reaches the head at 4×4), the usual CIFAR change, also the SmartDeal reference's.
- `smartdeal_reference=True` reproduces the block of the SmartDeal reference code (kuangliu's
  CIFAR MobileNetV2) instead of the paper's: ReLU, an expand conv even at expansion 1, a 1×1 conv +
  batch norm shortcut on stride-1 blocks whose width changes, and no shortcut on stride-2 blocks.

Dropout before the classifier (torchvision: 0.2) is off unless `dropout_rate` > 0, in which case
`apply(..., train=True)` needs `rngs={'dropout': key}`.

Modules and layers: `stem` (`conv`, `bn`), `stage{s}_block{b}` (`expand_conv`, `depthwise_conv`,
`project_conv`, `shortcut_conv`, each with a matching `..._bn`), `head` (`conv`, `bn`, `dense`); stages
(rows of the paper's table 2) count from 1, blocks from 0.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, Head, Stem, batch_norm, check_images, check_layout, conv

STEMS = ("cifar", "imagenet")
# (expansion t, output channels c, blocks n, stride s of the first block), paper table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_FEATURES = 32
HEAD_FEATURES = 1280


class InvertedResidual(nn.Module):
    """1×1 expansion to `expansion` × the input width, 3×3 depthwise conv with the stride, 1×1 linear
    projection to `features`, each with batch norm; identity shortcut where the shape holds (the
    reference block also has a 1×1 conv shortcut on stride-1 blocks whose width changes)."""

    expansion: int
    features: int
    stride: int
    smartdeal_reference: bool
    activation: Callable[[jnp.ndarray], jnp.ndarray]
    conv: ModuleFactory
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        bn = lambda y, name: batch_norm(self, y, train=train, name=name)
        in_features = x.shape[-1]
        hidden = self.expansion * in_features
        y = x
        if self.expansion != 1 or self.smartdeal_reference:
            y = conv(self, y, features=hidden, kernel=1, stride=1, name="expand_conv")
            y = self.activation(bn(y, "expand_bn"))
        y = conv(self, y, features=hidden, kernel=3, stride=self.stride, name="depthwise_conv", groups=hidden)
        y = self.activation(bn(y, "depthwise_bn"))
        y = bn(conv(self, y, features=self.features, kernel=1, stride=1, name="project_conv"), "project_bn")
        if self.stride == 1 and in_features == self.features:
            return y + x
        if self.stride == 1 and self.smartdeal_reference:
            shortcut = conv(self, x, features=self.features, kernel=1, stride=1, name="shortcut_conv")
            return y + bn(shortcut, "shortcut_bn")
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 with the ImageNet or the CIFAR stem."""

    num_classes: int
    stem: str = "imagenet"
    smartdeal_reference: bool = False
    dropout_rate: float = 0.0
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.stem not in STEMS:
            raise ValueError(f"MobileNetV2: stem {self.stem!r} is not one of {STEMS}")
        check_images(x, "MobileNetV2")
        check_layout(self)
        act = nn.relu if self.smartdeal_reference else nn.relu6
        cifar = self.stem == "cifar"
        x = Stem(STEM_FEATURES, 3, 1 if cifar else 2, self.conv, self.dtype, activation=act, name="stem")(
            jnp.asarray(x, self.dtype), train=train)
        for s, (expansion, features, num_blocks, first_stride) in enumerate(STAGES, start=1):
            if cifar and s == 2:
                first_stride = 1
            for b in range(num_blocks):
                x = InvertedResidual(expansion, features, first_stride if b == 0 else 1, self.smartdeal_reference,
                                     act, self.conv, self.dtype, name=f"stage{s}_block{b}")(x, train=train)
        head = Head(self.num_classes, self.conv, self.dense, self.dtype, conv_features=HEAD_FEATURES, batch_norm=True,
                    activation=act, dropout_rate=self.dropout_rate, name="head")
        return head(x, train=train)
