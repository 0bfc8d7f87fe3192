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

Layer names: `stem/conv`, `stem/bn`, `stage{s}_block{b}/expand_conv`, `.../depthwise_conv`,
`.../project_conv`, `.../shortcut_conv` (each with a matching `..._bn`), `head/conv`, `head/bn`,
`head/dense`; stages (rows of the paper's table 2) count from 1, blocks from 0.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, batch_norm, check_images, classifier_head, conv

STEMS = ("cifar", "imagenet")
# (expansion t, output channels c, blocks n, stride s of the first block), paper table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_FEATURES = 32
HEAD_FEATURES = 1280


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
        act = nn.relu if self.smartdeal_reference else nn.relu6
        bn = lambda y, name: batch_norm(y, train=train, name=name, dtype=self.dtype)
        convk = lambda y, features, kernel, stride, name, groups=1: conv(
            self.conv, y, features=features, kernel=kernel, stride=stride, name=name, dtype=self.dtype, groups=groups)
        cifar = self.stem == "cifar"

        x = jnp.asarray(x, self.dtype)
        x = act(bn(convk(x, STEM_FEATURES, 3, 1 if cifar else 2, "stem/conv"), "stem/bn"))
        for s, (expansion, features, num_blocks, first_stride) in enumerate(STAGES, start=1):
            if cifar and s == 2:
                first_stride = 1
            for b in range(num_blocks):
                where = f"stage{s}_block{b}"
                stride = first_stride if b == 0 else 1
                in_features = x.shape[-1]
                hidden = expansion * in_features
                y = x
                if expansion != 1 or self.smartdeal_reference:
                    y = act(bn(convk(y, hidden, 1, 1, f"{where}/expand_conv"), f"{where}/expand_bn"))
                y = convk(y, hidden, 3, stride, f"{where}/depthwise_conv", groups=hidden)
                y = act(bn(y, f"{where}/depthwise_bn"))
                y = bn(convk(y, features, 1, 1, f"{where}/project_conv"), f"{where}/project_bn")
                if stride == 1 and in_features == features:
                    x = y + x
                elif stride == 1 and self.smartdeal_reference:
                    x = y + bn(convk(x, features, 1, 1, f"{where}/shortcut_conv"), f"{where}/shortcut_bn")
                else:
                    x = y
        x = act(bn(convk(x, HEAD_FEATURES, 1, 1, "head/conv"), "head/bn"))
        return classifier_head(x, num_classes=self.num_classes, dense=self.dense, dtype=self.dtype,
                               dropout_rate=self.dropout_rate, train=train)
