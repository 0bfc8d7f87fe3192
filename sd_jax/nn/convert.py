"""Dense <-> SD conversion of a model's variables.

- `to_sd(variables, rules)`: a dense model's variables (`params`, `batch_stats`, ...) -> the variables
  of the same model built in SD form with the same `SDRules` (`models.get(name, sd=rules)` or
  `swap_layers(model, rules)`), through one batched `sd_jax.core.network.decompose_network` call;
  also returns the decomposition (per-layer reports of the fit). It sees kernels, not layer types:
  `swap_layers` refuses a layer it cannot run as SD (e.g. `nn.ConvTranspose`) whose kernel the rules
  select, so a skip rule for it keeps it dense in both and the variables fit the swapped model.
- `sd_variables(tree)`: a parameter tree whose decomposed kernels are `Decomposition`s (what
  `decompose_network(...).tree` returns) -> variables of the SD model: B, C and the mask go to
  `sd_basis`, `sd_coeff`, `sd_mask` under the layer's name, everything else stays in `params`.
- `sd_tree(model, variables, *inputs)`: the inverse, SD variables -> that tree, with each SD kernel a
  `Decomposition` holding the coefficients the layer uses (q(C) * mask). It feeds the report
  (`sd_jax.nn.report`) and export; `sd_variables(sd_tree(...))` gives the variables back.
- `dense_variables(model, variables, *inputs)`: SD variables -> the dense model's variables, each SD
  kernel rebuilt as the layer rebuilds it, for evaluation and export.

`sd_tree` and `dense_variables` trace `model.apply(variables, *inputs, **apply_kwargs)` abstractly
(`jax.eval_shape`, nothing is computed) to learn each SD layer's kernel shape and options; pass
the arguments the model's `apply` needs, e.g. `dense_variables(model, v, x, train=False)`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.core import blocking, pow2
from sd_jax.core.decompose import DecomposeOptions, Decomposition
from sd_jax.core.network import NetworkDecomposition, decompose_network
from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_COLLECTIONS, SD_MASK, SDOptions, record_layouts, rebuild_kernel

from sd_jax.nn.rules import SDRules, layer_name

Array = jax.Array


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


def _kernel_layers(params: Any) -> dict[str, tuple[int, ...]]:
    """{layer name: kernel shape} of every leaf named 'kernel' in a parameter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {layer_name(_keys(path)[:-1]): tuple(np.shape(leaf)) for path, leaf in leaves
            if _keys(path)[-1] == "kernel"}


def to_sd(variables: dict[str, Any], rules: SDRules | None = None) -> tuple[dict[str, Any], NetworkDecomposition]:
    """Decompose the kernels `rules` select; return (SD variables, the decomposition with its reports).

    Collections other than `params` (e.g. `batch_stats`) are passed through unchanged.
    """
    rules = SDRules() if rules is None else rules
    if "params" not in variables:
        raise ValueError(f"to_sd: variables have no 'params' collection (collections: {sorted(variables)}); "
                         "pass the dict that model.init returns")
    present = sorted(set(SD_COLLECTIONS) & set(variables))
    if present:
        raise ValueError(f"to_sd: variables already hold SD collections {present}; pass a dense model's variables")
    rules.check_matches(_kernel_layers(variables["params"]))
    decomposition = decompose_network(variables["params"], rules.planner())
    others = {name: value for name, value in variables.items() if name != "params"}
    return {**others, **sd_variables(decomposition.tree)}, decomposition


def _get(tree: dict, keys: tuple[str, ...], collection: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            raise ValueError(f"layer '{layer_name(keys[:-1])}': the variables have no {collection}/"
                             f"{'/'.join(keys)}; pass the variables of this SD model")
        tree = tree[key]
    return tree


def _copy(tree: Any) -> Any:
    return {key: _copy(value) for key, value in tree.items()} if isinstance(tree, dict) else tree


@functools.partial(jax.jit, static_argnums=0)
def _used_coefficients(options: tuple[SDOptions, ...], coeffs: list[Array], masks: list[Array]) -> list[Array]:
    """q(C) * mask of several layers in one compiled call ('pow2' layers: C * mask)."""
    return [jnp.where(mask, pow2.quantize_pow2(coeff, o.threshold, o.max_coeff) if o.mode == "latent" else coeff, 0.0)
            for o, coeff, mask in zip(options, coeffs, masks)]


@functools.partial(jax.jit, static_argnums=0)
def _rebuilt_kernels(specs: tuple[blocking.BlockSpec, ...], coeffs: list[Array], bases: list[Array]) -> list[Array]:
    """The kernels of several layers, rebuilt as SD layers rebuild them, in one compiled call."""
    return [rebuild_kernel(coeff, basis, coeff != 0, spec, mode="pow2", threshold=0.0, max_coeff=0.0)
            for spec, coeff, basis in zip(specs, coeffs, bases)]


def sd_tree(model: Any, variables: dict[str, Any], *inputs: Any, **apply_kwargs: Any) -> Any:
    """The `params` tree with each SD layer's kernel as a `Decomposition` of the coefficients it uses."""
    with record_layouts() as layouts:
        jax.eval_shape(lambda v, *x: model.apply(v, *x, **apply_kwargs), variables, *inputs)
    paths = list(layouts)
    stored = {collection: [_get(variables.get(collection, {}), (*path, leaf), collection) for path in paths]
              for collection, leaf in ((SD_COEFF, "coeff"), (SD_BASIS, "basis"), (SD_MASK, "mask"))}
    coeffs = _used_coefficients(tuple(layouts[path].options for path in paths), stored[SD_COEFF], stored[SD_MASK])
    tree = _copy(variables.get("params", {}))
    for path, coeff, basis, mask in zip(paths, coeffs, stored[SD_BASIS], stored[SD_MASK]):
        layout = layouts[path]
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = Decomposition(
            basis=jnp.asarray(basis), coeff=coeff, mask=jnp.asarray(mask), row_scale=None, spec=layout.spec,
            options=DecomposeOptions.from_kwargs(
                layer_name(path), threshold=float(layout.options.threshold), max_coeff=float(layout.options.max_coeff),
                group_size=layout.options.group_size, row_length=layout.options.row_length,
                max_rows=layout.options.max_rows),
        )
    return tree


def dense_variables(model: Any, variables: dict[str, Any], *inputs: Any, **apply_kwargs: Any) -> dict[str, Any]:
    """The dense model's variables: SD kernels rebuilt into `params`, SD collections dropped."""
    is_decomposition = lambda leaf: isinstance(leaf, Decomposition)
    leaves, treedef = jax.tree_util.tree_flatten(sd_tree(model, variables, *inputs, **apply_kwargs),
                                                 is_leaf=is_decomposition)
    decomposed = [i for i, leaf in enumerate(leaves) if is_decomposition(leaf)]
    kernels = _rebuilt_kernels(tuple(leaves[i].spec for i in decomposed), [leaves[i].coeff for i in decomposed],
                               [leaves[i].basis for i in decomposed])
    for i, kernel in zip(decomposed, kernels):
        leaves[i] = kernel
    others = {name: value for name, value in variables.items() if name not in ("params", *SD_COLLECTIONS)}
    return {**others, "params": jax.tree_util.tree_unflatten(treedef, leaves)}
