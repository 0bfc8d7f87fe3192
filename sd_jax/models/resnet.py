"""ResNet-18/34/50 (He et al. 2016), widths 64-128-256-512, with a CIFAR or an ImageNet stem.

- stem 'imagenet': 7×7 conv, stride 2, then 3×3 max-pool, stride 2 (torchvision's `resnet18` etc.;
  ResNet-50 is "v1.5", stride on the 3×3 conv of the bottleneck).
- stem 'cifar': 3×3 conv, stride 1, no max-pool (the CIFAR ResNet-18 of the SmartDeal reference code,
  itself kuangliu/pytorch-cifar's).
Shortcuts are 1×1 conv + batch norm where the shape changes, identity elsewhere.

Layer names: `stem/conv`, `stem/bn`, `stage{s}_block{b}/conv{i}`, `.../bn{i}`, `.../shortcut_conv`,
`.../shortcut_bn`, `head/dense`; stages count from 1, blocks from 0.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, batch_norm, check_images, classifier_head, conv

STEMS = ("cifar", "imagenet")
BLOCKS = ("basic", "bottleneck")
WIDTHS = (64, 128, 256, 512)


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
        bn = lambda y, name: batch_norm(y, train=train, name=name, dtype=self.dtype)
        convk = lambda y, features, kernel, stride, name: conv(
            self.conv, y, features=features, kernel=kernel, stride=stride, name=name, dtype=self.dtype)
        expansion = 4 if self.block == "bottleneck" else 1

        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(bn(convk(x, 64, 7, 2, "stem/conv"), "stem/bn"))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.relu(bn(convk(x, 64, 3, 1, "stem/conv"), "stem/bn"))

        for s, (width, num_blocks) in enumerate(zip(WIDTHS, self.stage_sizes), start=1):
            out_features = expansion * width
            for b in range(num_blocks):
                where = f"stage{s}_block{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                if stride != 1 or x.shape[-1] != out_features:
                    shortcut = bn(convk(x, out_features, 1, stride, f"{where}/shortcut_conv"), f"{where}/shortcut_bn")
                else:
                    shortcut = x
                if self.block == "basic":
                    y = nn.relu(bn(convk(x, width, 3, stride, f"{where}/conv1"), f"{where}/bn1"))
                    y = bn(convk(y, width, 3, 1, f"{where}/conv2"), f"{where}/bn2")
                else:
                    y = nn.relu(bn(convk(x, width, 1, 1, f"{where}/conv1"), f"{where}/bn1"))
                    y = nn.relu(bn(convk(y, width, 3, stride, f"{where}/conv2"), f"{where}/bn2"))
                    y = bn(convk(y, out_features, 1, 1, f"{where}/conv3"), f"{where}/bn3")
                x = nn.relu(y + shortcut)
        return classifier_head(x, num_classes=self.num_classes, dense=self.dense, dtype=self.dtype)
