"""VGG-11/16/19 with batch norm for 32×32 images (Simonyan & Zisserman 2015, configurations A, D, E).

The CIFAR form used across the pruning literature: 3×3 convs (no bias; batch norm follows), 2×2
max-pools, then global average pooling (1×1 after five pools on 32×32) and one dense classifier.
Inputs must be at least 32×32.

Modules and layers: `stage{s}` (`conv{i}`, `bn{i}`; a stage ends at each max-pool; both count from 1),
`head` (`dense`).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, Head, batch_norm, check_images, check_layout, conv

# Output widths of the convs, one tuple per stage; each stage ends with a 2×2 max-pool.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGStage(nn.Module):
    """3×3 convs of `widths` (`conv{i}`), each with batch norm (`bn{i}`) and ReLU, then a 2×2 max-pool."""

    widths: Sequence[int]
    conv: ModuleFactory
    dtype: Any
    stored_activation_bits: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        for i, width in enumerate(self.widths, start=1):
            x = conv(self, x, features=width, kernel=3, stride=1, name=f"conv{i}")
            x = batch_norm(self, x, train=train, name=f"bn{i}", relu=True, stored_bits=self.stored_activation_bits)
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """VGG-`depth` with batch norm, for CIFAR-sized inputs."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32
    stored_activation_bits: int | None = None  # batch norm's and ReLU's, see `sd_jax.nn.batch_norm`

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG: depth {self.depth} is not one of {sorted(CONFIGS)}")
        check_images(x, f"vgg{self.depth}")
        if min(x.shape[1:3]) < 32:
            raise ValueError(f"vgg{self.depth}: input {x.shape[1]}×{x.shape[2]} is smaller than 32×32; "
                             "five 2×2 max-pools need at least 32×32 images")
        check_layout(self)
        x = jnp.asarray(x, self.dtype)
        for s, widths in enumerate(CONFIGS[self.depth], start=1):
            x = VGGStage(widths, self.conv, self.dtype, self.stored_activation_bits, name=f"stage{s}")(x, train=train)
        return Head(self.num_classes, self.conv, self.dense, self.dtype, name="head")(x, train=train)
