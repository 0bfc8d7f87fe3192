"""Whole-network decomposition: every kernel of a parameter tree, options chosen by name rules.

Rules are `(pattern, options)` pairs; `pattern` is a regular expression searched in the slash-joined
path of a kernel ("stage1_block0/conv1/kernel"), the first matching rule wins, and its options
override the defaults. Two rule keys are not decomposition options: `kind` ("conv", "dense",
"depthwise") and `skip` (True keeps the kernel dense). Without a rule the kind follows the shape:
rank 2 is "dense", rank 4 is "conv"; convolutions wider than `max_kernel_size` (the 7 x 7 stem of an
ImageNet ResNet) stay dense, as in the reference, unless a rule names them. A rule that matches no
kernel is an error: it is almost always a typo.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sd_jax.core.decompose import Decomposition, DecomposeOptions, TensorJob, decompose_many
from sd_jax.core.report import TensorReport

Rule = tuple[str, Mapping[str, Any]]

RULE_KEYS = ("kind", "skip")


@dataclasses.dataclass(frozen=True)
class NetworkDecomposition:
    """The SD tree (kernels replaced by `Decomposition`s), per-layer reports and dense leftovers."""

    tree: Any
    reports: list[TensorReport]
    dense_params: int  # parameters left dense: biases, norms, skipped kernels

    def reconstruct(self) -> Any:
        """The parameter tree with every decomposed kernel rebuilt as C·B."""
        return jax.tree.map(
            lambda leaf: leaf.reconstruct() if isinstance(leaf, Decomposition) else leaf,
            self.tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition),
        )


def path_name(path: tuple) -> str:
    """'a/b/kernel' for a tree path of dict keys, sequence indices or attributes."""
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _default_kind(shape: tuple[int, ...], max_kernel_size: int) -> str | None:
    if len(shape) == 2:
        return "dense"
    if len(shape) == 4 and max(shape[0], shape[1]) <= max_kernel_size:
        return "conv"
    return None


def _check_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern, dict[str, Any]]]:
    compiled = []
    for index, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], Mapping)):
            raise ValueError(f"rule {index}: {rule!r} is not a (pattern, options-dict) pair")
        pattern, options = rule
        try:
            compiled.append((re.compile(pattern), dict(options)))
        except re.error as error:
            raise ValueError(f"rule {index}: pattern {pattern!r} is not a valid regular expression ({error})") from None
    return compiled


def decompose_network(
    params: Any,
    rules: Sequence[Rule] = (),
    *,
    kernel_names: Sequence[str] = ("kernel",),
    max_kernel_size: int = 5,
    **defaults: Any,
) -> NetworkDecomposition:
    """Decompose every kernel leaf (a leaf named in `kernel_names`) of `params` in batched calls.

    `defaults` are `DecomposeOptions` fields applied to every kernel; `rules` override them per layer.
    """
    DecomposeOptions.from_kwargs("defaults", **defaults)
    compiled = _check_rules(rules)
    used = [False] * len(compiled)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    jobs: list[tuple[int, TensorJob]] = []
    dense_params = 0
    for index, (path, leaf) in enumerate(leaves):
        name = path_name(path)
        shape = tuple(np.shape(leaf))
        is_kernel = bool(path) and path_name(path[-1:]) in kernel_names
        rule = None
        for rule_index, (pattern, options) in enumerate(compiled):
            if is_kernel and pattern.search(name):
                used[rule_index] = True
                rule = options
                break
        options = dict(defaults, **(rule or {}))
        kind = options.pop("kind", None) or (_default_kind(shape, max_kernel_size) if is_kernel else None)
        if not is_kernel or options.pop("skip", False) or kind is None:
            dense_params += math.prod(shape)
            continue
        jobs.append((index, TensorJob(name, leaf, kind, DecomposeOptions.from_kwargs(name, **options))))
    unused = [compiled[i][0].pattern for i, hit in enumerate(used) if not hit]
    if unused:
        raise ValueError(
            f"rule pattern(s) {unused} match no kernel; kernels are: "
            f"{[path_name(p) for p, _ in leaves if p and path_name(p[-1:]) in kernel_names]}"
        )
    if not jobs:
        raise ValueError("no kernel to decompose: the tree has no 'kernel' leaf of rank 2 or 4 left by the rules")
    results = decompose_many([job for _, job in jobs])
    new_leaves = [leaf for _, leaf in leaves]
    for (index, _), result in zip(jobs, results):
        new_leaves[index] = result
    tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return NetworkDecomposition(tree=tree, reports=[r.report for r in results], dense_params=dense_params)
