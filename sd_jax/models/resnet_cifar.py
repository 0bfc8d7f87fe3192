"""ResNets for 32×32 images with widths 16-32-64 (He et al. 2016, section 4.2 and "Identity Mappings").

- `CifarResNet`: depth 6n + 2 (ResNet-20/32/44/56/110), basic blocks, post-activation, and the
  parameter-free option-A shortcut (stride-2 subsampling plus zero channels), so the parameter counts
  are the paper's: 0.27 M, 0.46 M, 0.66 M, 0.85 M, 1.7 M.
- `CifarPreActResNet`: depth 9n + 2 (ResNet-164), pre-activation bottleneck blocks (expansion 4,
  1×1 projection shortcut where the shape changes), 1.7 M parameters.

Layer names: `stem/conv`, `stem/bn`, `stage{s}_block{b}/conv{i}`, `.../bn{i}`, `.../shortcut_conv`,
`head/bn` (pre-activation only), `head/dense`; stages count from 1, blocks from 0.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, batch_norm, check_images, classifier_head, conv

WIDTHS = (16, 32, 64)


def _option_a_shortcut(x: jnp.ndarray, features: int, stride: int) -> jnp.ndarray:
    """Identity shortcut that subsamples by `stride` and zero-pads channels equally on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR with basic blocks and option-A shortcuts."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CifarResNet: depth {self.depth} is not 6n + 2 with n >= 1; use 20, 32, 44, 56 or 110")
        check_images(x, f"resnet{self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        bn = lambda y, name: batch_norm(y, train=train, name=name, dtype=self.dtype)
        conv3x3 = lambda y, features, stride, name: conv(
            self.conv, y, features=features, kernel=3, stride=stride, name=name, dtype=self.dtype)

        x = jnp.asarray(x, self.dtype)
        x = nn.relu(bn(conv3x3(x, WIDTHS[0], 1, "stem/conv"), "stem/bn"))
        for s, width in enumerate(WIDTHS, start=1):
            for b in range(blocks_per_stage):
                where = f"stage{s}_block{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                y = nn.relu(bn(conv3x3(x, width, stride, f"{where}/conv1"), f"{where}/bn1"))
                y = bn(conv3x3(y, width, 1, f"{where}/conv2"), f"{where}/bn2")
                x = nn.relu(y + _option_a_shortcut(x, width, stride))
        return classifier_head(x, num_classes=self.num_classes, dense=self.dense, dtype=self.dtype)


class CifarPreActResNet(nn.Module):
    """Pre-activation ResNet-(9n+2) for CIFAR with bottleneck blocks (ResNet-164: n = 18)."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if (self.depth - 2) % 9 or self.depth < 11:
            raise ValueError(f"CifarPreActResNet: depth {self.depth} is not 9n + 2 with n >= 1; use e.g. 164")
        check_images(x, f"resnet{self.depth}")
        blocks_per_stage = (self.depth - 2) // 9
        bn = lambda y, name: batch_norm(y, train=train, name=name, dtype=self.dtype)
        convk = lambda y, features, kernel, stride, name: conv(
            self.conv, y, features=features, kernel=kernel, stride=stride, name=name, dtype=self.dtype)

        x = jnp.asarray(x, self.dtype)
        x = convk(x, WIDTHS[0], 3, 1, "stem/conv")
        for s, width in enumerate(WIDTHS, start=1):
            out_features = 4 * width
            for b in range(blocks_per_stage):
                where = f"stage{s}_block{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                pre = nn.relu(bn(x, f"{where}/bn1"))
                if stride != 1 or x.shape[-1] != out_features:
                    shortcut = convk(pre, out_features, 1, stride, f"{where}/shortcut_conv")
                else:
                    shortcut = x
                y = convk(pre, width, 1, 1, f"{where}/conv1")
                y = convk(nn.relu(bn(y, f"{where}/bn2")), width, 3, stride, f"{where}/conv2")
                y = convk(nn.relu(bn(y, f"{where}/bn3")), out_features, 1, 1, f"{where}/conv3")
                x = y + shortcut
        x = nn.relu(bn(x, "head/bn"))
        return classifier_head(x, num_classes=self.num_classes, dense=self.dense, dtype=self.dtype)
