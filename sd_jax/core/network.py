"""Whole-network decomposition: every kernel of a parameter tree in batched calls, options per kernel.

Which kernels are decomposed, as what kind ("conv", "dense", "depthwise") and with which
`DecomposeOptions`, is a plan: a function from a kernel's slash-joined path
("stage1_block0/conv1/kernel") and shape to `(kind, options)`, or None to keep the kernel dense. The
core does no name matching: `sd_jax.nn.rules.SDRules.planner()` turns the one rule engine (patterns on
layer names) into a plan. Without a plan every kernel gets the same options (`uniform`), its kind
following the shape: rank 2 is "dense", rank 4 is "conv"; convolutions wider than `max_kernel_size`
(the 7 x 7 stem of an ImageNet ResNet) stay dense, as in the reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sd_jax.core.decompose import Decomposition, DecomposeOptions, TensorJob, decompose_many
from sd_jax.core.report import TensorReport

# The widest convolution decomposed unless a rule names it: the reference leaves its 7 x 7 stem dense.
MAX_KERNEL_SIZE = 5
KernelPlan = tuple[str, DecomposeOptions]  # (kind, options) of one kernel
Planner = Callable[[str, tuple[int, ...]], "KernelPlan | None"]  # (kernel path, shape) -> plan, None: dense


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


def default_kind(shape: Sequence[int], max_kernel_size: int = MAX_KERNEL_SIZE) -> str | None:
    """The kind of a kernel no rule names: "dense" for rank 2, "conv" for a 2-D convolution up to
    `max_kernel_size` wide, None (keep dense) otherwise."""
    if len(shape) == 2:
        return "dense"
    if len(shape) == 4 and max(shape[0], shape[1]) <= max_kernel_size:
        return "conv"
    return None


def uniform(options: DecomposeOptions | None = None, *, max_kernel_size: int = MAX_KERNEL_SIZE) -> Planner:
    """A plan giving every kernel `options` (default: `DecomposeOptions()`), its kind by `default_kind`."""
    options = DecomposeOptions() if options is None else options

    def plan(path: str, shape: tuple[int, ...]) -> KernelPlan | None:
        kind = default_kind(shape, max_kernel_size)
        return None if kind is None else (kind, options)

    return plan


def decompose_network(
    params: Any,
    plan: Planner | None = None,
    *,
    kernel_names: Sequence[str] = ("kernel",),
    **options: Any,
) -> NetworkDecomposition:
    """Decompose every kernel leaf (a leaf named in `kernel_names`) of `params` that `plan` selects, in
    batched calls.

    Without `plan`, `options` (`DecomposeOptions` fields) go to every kernel (`uniform`); with a plan,
    the plan holds the options, so passing both raises ValueError.
    """
    if plan is None:
        plan = uniform(DecomposeOptions.from_kwargs("decompose_network options", **options))
    elif options:
        raise ValueError(f"decompose_network: options {sorted(options)} given beside a plan; put them in the plan "
                         "(e.g. SDRules(**options).planner())")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    jobs: list[tuple[int, TensorJob]] = []
    dense_params = 0
    for index, (path, leaf) in enumerate(leaves):
        shape = tuple(np.shape(leaf))
        chosen = plan(path_name(path), shape) if path and path_name(path[-1:]) in kernel_names else None
        if chosen is None:
            dense_params += math.prod(shape)
            continue
        kind, kernel_options = chosen
        name = path_name(path)
        jobs.append((index, TensorJob(name, leaf, kind, kernel_options.validate(name))))
    if not jobs:
        raise ValueError("no kernel to decompose: the tree has no 'kernel' leaf of rank 2 or 4 that the plan selects")
    results = decompose_many([job for _, job in jobs])
    new_leaves = [leaf for _, leaf in leaves]
    for (index, _), result in zip(jobs, results):
        new_leaves[index] = result
    tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return NetworkDecomposition(tree=tree, reports=[r.report for r in results], dense_params=dense_params)
