"""Seeded stand-in variables for a zoo model, dense or SD, without running its initialisers.

Running `init` for real costs seconds per network on CPU (every initialiser of every distinct shape
compiles; SD layers also draw orthogonal bases). Tests and benchmarks that need variables of the
right shapes with sensible scales, not trained or initialised ones, use `synthetic_variables`.
"""
from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_MASK


def synthetic_variables(model: Any, x: jax.Array, seed: int = 0, mask_density: float = 0.9) -> dict[str, Any]:
    """Variables of `model` for input `x`, filled from their abstract shapes with a seeded generator.

    Dense kernels N(0, 1/fan_in); SD coefficients ±2^e, e in {-2, -1, 0}, zero outside a random mask
    of `mask_density`; SD bases N(0, 1 / (m k^2)) for (m, k) blocks, so rebuilt kernels have a
    variance of at most 1 / (m k) (about 1 / fan_in); batch-norm scales and variances 1, the rest 0.
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)
    masks: dict[tuple, np.ndarray] = {}

    def mask_of(path: tuple, shape: tuple[int, ...]) -> np.ndarray:
        layer = tuple(key.key for key in path[1:-1])
        if layer not in masks:
            masks[layer] = rng.random(shape) < mask_density
        return masks[layer]

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        collection, name = path[0].key, path[-1].key
        if collection == SD_COEFF:
            values = np.exp2(-rng.integers(0, 3, leaf.shape)) * rng.choice([-1.0, 1.0], leaf.shape)
            return jnp.asarray(np.where(mask_of(path, leaf.shape), values, 0.0), jnp.float32)
        if collection == SD_MASK:
            return jnp.asarray(mask_of(path, leaf.shape))
        if collection == SD_BASIS:
            coeff_rows = abstract[SD_COEFF]
            for key in path[1:-1]:
                coeff_rows = coeff_rows[key.key]
            m, k = coeff_rows["coeff"].shape[1:]
            return jnp.asarray(rng.normal(0.0, (m * k * k) ** -0.5, leaf.shape), jnp.float32)
        if name == "kernel":
            return jnp.asarray(rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape), jnp.float32)
        return jnp.asarray(np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype))

    return jax.tree_util.tree_map_with_path(fill, abstract)


def he_normal_params(model: Any, input_shape: tuple, seed: int = 0) -> dict[str, Any]:
    """The model's parameters with He-normal kernels (std sqrt(2 / fan_in)) and zeros elsewhere."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if str(getattr(path[-1], "key", path[-1])) != "kernel":
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) * math.sqrt(2.0 / math.prod(leaf.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(shapes))
