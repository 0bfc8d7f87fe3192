"""Dense -> SD conversion of variables: a decomposed parameter tree as variables of SD layers.

`sd_jax.core.network.decompose_network(params, rules).tree` is the parameter tree with every
decomposed kernel replaced by a `Decomposition`. `sd_variables` turns it into the variables of the
same model built with `SDConv` / `SDDense` for exactly those layers (and nn.Conv / nn.Dense for the
kernels left dense, e.g. a 7×7 stem): B, C and the mask go to `sd_basis`, `sd_coeff`, `sd_mask`
under the layer's name, everything else stays in `params`. Batch statistics are untouched; pass the
dense model's `batch_stats` along.

The SD layers must block the kernels as the decomposition did (same group_size, row_length,
max_rows; they raise ValueError otherwise). In 'latent' mode the layer re-quantizes C with its own
threshold: give it a threshold no larger than the smallest magnitude in C
(`sd_jax.core.pow2.min_coeff(decomposition threshold)`), or small coefficients vanish on the first
step; 'pow2' mode uses C as is.
"""
from __future__ import annotations

from typing import Any

import jax

from sd_jax.core.decompose import Decomposition
from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_MASK


def _keys(path: tuple) -> list[str]:
    keys = []
    for entry in path:
        if not isinstance(entry, jax.tree_util.DictKey):
            raise ValueError(f"variables path {jax.tree_util.keystr(path)} is not made of dict keys; "
                             "pass a Flax variable dict")
        keys.append(entry.key)
    return keys


def _put(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def sd_variables(tree: Any) -> dict[str, Any]:
    """Variables {'params', 'sd_basis', 'sd_coeff', 'sd_mask'} from a tree with Decomposition leaves."""
    collections: dict[str, dict] = {"params": {}, SD_BASIS: {}, SD_COEFF: {}, SD_MASK: {}}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition))[0]
    for path, leaf in leaves:
        keys = _keys(path)
        if not isinstance(leaf, Decomposition):
            _put(collections["params"], keys, leaf)
            continue
        name = "/".join(keys)
        if keys[-1] != "kernel":
            raise ValueError(f"'{name}': a Decomposition must replace a leaf named 'kernel'")
        if leaf.row_scale is not None:
            raise ValueError(f"'{name}': decomposed with row_scale=True, but SD layers store no row "
                             "scale; decompose with row_scale=False")
        layer = keys[:-1]
        _put(collections[SD_BASIS], layer + ["basis"], leaf.basis)
        _put(collections[SD_COEFF], layer + ["coeff"], leaf.coeff)
        _put(collections[SD_MASK], layer + ["mask"], leaf.mask)
    return collections
