"""VGG-11/16/19 with batch norm for 32×32 images (Simonyan & Zisserman 2015, configurations A, D, E).

The CIFAR form used across the pruning literature: 3×3 convs (no bias; batch norm follows), 2×2
max-pools, then global average pooling (1×1 after five pools on 32×32) and one dense classifier.
Inputs must be at least 32×32.

Layer names: `stage{s}/conv{i}`, `stage{s}/bn{i}` (a stage ends at each max-pool; both count from 1),
`head/dense`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.common import ModuleFactory, batch_norm, check_images, classifier_head, conv

# Output widths of the convs, one tuple per stage; each stage ends with a 2×2 max-pool.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
    """VGG-`depth` with batch norm, for CIFAR-sized inputs."""

    depth: int
    num_classes: int
    conv: ModuleFactory = nn.Conv
    dense: ModuleFactory = nn.Dense
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG: depth {self.depth} is not one of {sorted(CONFIGS)}")
        check_images(x, f"vgg{self.depth}")
        if min(x.shape[1:3]) < 32:
            raise ValueError(f"vgg{self.depth}: input {x.shape[1]}×{x.shape[2]} is smaller than 32×32; "
                             "five 2×2 max-pools need at least 32×32 images")
        x = jnp.asarray(x, self.dtype)
        for s, widths in enumerate(CONFIGS[self.depth], start=1):
            for i, width in enumerate(widths, start=1):
                x = conv(self.conv, x, features=width, kernel=3, stride=1, name=f"stage{s}/conv{i}", dtype=self.dtype)
                x = nn.relu(batch_norm(x, train=train, name=f"stage{s}/bn{i}", dtype=self.dtype))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return classifier_head(x, num_classes=self.num_classes, dense=self.dense, dtype=self.dtype)
