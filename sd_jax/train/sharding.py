"""Data parallelism: a one-axis `Mesh` named "data", the batch split over it, variables replicated.

`jax.jit` with `NamedSharding` does the rest (pjit is the same thing now). Large kernels can be
sharded over the same axis by a rule (`shard_large`), for models whose weights do not fit one device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with one axis, "data"."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shard_large(tree: Any, mesh: Mesh, min_size: int = 1 << 22) -> Any:
    """Shardings for a variable tree: arrays of at least `min_size` entries whose last axis divides
    the mesh are split over "data" along it; the rest are replicated."""
    size = mesh.shape[DATA]

    def rule(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        if np.prod(shape, dtype=np.int64) >= min_size and shape and shape[-1] % size == 0:
            return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), DATA))
        return replicated(mesh)

    return jax.tree.map(rule, tree)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless the global batch splits evenly over the mesh."""
    devices = mesh.shape[DATA]
    if batch_size % devices:
        raise ValueError(
            f"batch size {batch_size} does not divide over {devices} devices; pass a multiple of {devices}"
        )
