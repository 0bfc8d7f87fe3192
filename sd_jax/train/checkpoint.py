"""Reading and writing parameter trees: Orbax checkpoints and `.npz` files, never pickle.

`load_params` takes an Orbax checkpoint directory (a `StandardCheckpointer` save, or a
`CheckpointManager` root, whose latest step is read), or an `.npz` whose keys are slash-joined
paths ("block0/conv1/kernel"). A tree with a top-level "params" entry (a saved train state) yields
that entry. Writes are atomic: a file appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import NetworkDecomposition, path_name
from sd_jax.core import report as report_lib


class CheckpointError(ValueError):
    """A parameter file or checkpoint is missing, unreadable or of the wrong kind."""


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {key!r} nests under a leaf; the file's keys are inconsistent")
        node[leaf] = value
    return tree


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """{'a': {'b': x}} -> {'a/b': np.asarray(x)}."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(path): np.asarray(leaf) for path, leaf in leaves}


def load_variables(path: str) -> dict[str, Any]:
    """The tree stored at `path` (.npz file or Orbax checkpoint directory); for a training
    checkpoint of `sd_jax.train` (items "state" and "data"), its variable collections."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path}: no such file or directory; pass an .npz of parameters or an Orbax checkpoint directory"
        )
    tree = _load_npz(path) if os.path.isfile(path) else _load_orbax(path)
    state = tree.get("state") if isinstance(tree, Mapping) else None
    if isinstance(state, Mapping) and "trainable" in state:
        tree = {**state["trainable"], **state.get("frozen", {})}
    if not jax.tree.leaves(tree):
        raise CheckpointError(f"{path}: the checkpoint holds no arrays")
    return tree


def arrange_like(tree: Any, template: Any) -> Any:
    """`tree`'s leaves in `template`'s nesting, matched by '/'-joined path.

    The zoo's layer names contain '/' ('stage1_block0/conv1'), so an .npz of its variables (keys joined
    by '/') loads nested one level deeper than the model's tree; this undoes that. `tree` comes back
    unchanged when the joined paths differ, for the caller's structure check to report.
    """
    flat = {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [path_name(path) for path, _ in paths]
    if sorted(names) != sorted(flat):
        return tree
    return jax.tree_util.tree_unflatten(treedef, [flat[name] for name in names])


def load_params(path: str) -> dict[str, Any]:
    """The parameter tree stored at `path`: its "params" collection when it has one."""
    tree = load_variables(path)
    if isinstance(tree, Mapping) and "params" in tree and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    return tree


def _load_npz(path: str) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files if not key.startswith("__")}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise CheckpointError(
            f"{path}: not a readable .npz ({type(error).__name__}: {error}); the file is corrupt, "
            "truncated or holds pickled objects (not allowed): re-export it with numpy.savez"
        ) from None
    return unflatten(flat)


def _load_orbax(path: str) -> Any:
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    steps = [name for name in os.listdir(path) if name.isdigit()]
    checkpointer = ocp.StandardCheckpointer()
    try:
        if not steps:
            return _restore_here(checkpointer, os.path.abspath(path))
        step_dir = os.path.join(os.path.abspath(path), str(ocp.CheckpointManager(os.path.abspath(path)).latest_step()))
        items = sorted(d for d in os.listdir(step_dir)
                       if os.path.isdir(os.path.join(step_dir, d)) and not d.startswith("_"))
        if items == ["default"]:
            return _restore_here(checkpointer, os.path.join(step_dir, "default"))
        if "state" in items:  # a training checkpoint: its "data" item is the input position, not arrays
            items = ["state"]
        return {item: _restore_here(checkpointer, os.path.join(step_dir, item)) for item in items}
    except Exception as error:  # Orbax raises many types for a damaged directory
        raise CheckpointError(
            f"{path}: cannot restore the Orbax checkpoint ({type(error).__name__}: {error}); "
            "check that the directory is a complete StandardCheckpointer or CheckpointManager save"
        ) from None


def _restore_here(checkpointer: Any, directory: str) -> Any:
    """Restore every array onto this process's first device, whatever topology saved it (several
    processes, another mesh): Orbax refuses a sharded checkpoint of another topology without a target."""
    import orbax.checkpoint as ocp
    from etils import epath

    # the handler's metadata: StandardCheckpointer.metadata warns that an item has no step metadata file
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(directory))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
                          if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf, tree)
    return checkpointer.restore(directory, target)


def atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez to a temporary file in the same directory, then rename over `path`."""
    _atomic_write(path, lambda stream: np.savez(stream, **arrays), suffix=".npz", mode="wb")


def atomic_write_text(path: str, text: str) -> None:
    """`text` to a temporary file in the same directory, then renamed over `path` (reports, summaries)."""
    _atomic_write(path, lambda stream: stream.write(text), suffix=".tmp", mode="w")


def _atomic_write(path: str, write: Callable[[Any], Any], *, suffix: str, mode: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=suffix, dir=directory)
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def sd_collections(result: NetworkDecomposition) -> dict[str, dict[str, Any]]:
    """The SD tree as variable collections: params (dense leaves), sd_basis, sd_coeff, sd_mask.

    Each SD variable sits at the path its dense kernel had, so `sd_basis/block0/conv1/kernel` is the
    basis of `params/block0/conv1/kernel`; `sd_row_scale` appears only when row scaling was used.
    """
    collections: dict[str, dict[str, Any]] = {"params": {}, "sd_basis": {}, "sd_coeff": {}, "sd_mask": {}}
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        result.tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition)
    )
    for path, leaf in leaves:
        name = path_name(path)
        if isinstance(leaf, Decomposition):
            collections["sd_basis"][name] = leaf.basis
            collections["sd_coeff"][name] = leaf.coeff
            collections["sd_mask"][name] = leaf.mask
            if leaf.row_scale is not None:
                collections.setdefault("sd_row_scale", {})[name] = leaf.row_scale
        else:
            collections["params"][name] = leaf
    return {key: unflatten(value) for key, value in collections.items()}


def save_decomposition(path: str, result: NetworkDecomposition) -> None:
    """Write the SD collections and the JSON report to `path` (.npz file or Orbax directory)."""
    collections = sd_collections(result)
    report_json = report_lib.to_json(result.reports, result.dense_params)
    if path.endswith(".npz"):
        arrays = {f"{collection}/{key}": value for collection, tree in collections.items()
                  for key, value in flatten(tree).items()}
        arrays["__report__"] = np.array(report_json)
        atomic_savez(path, arrays)
        return
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), jax.tree.map(np.asarray, collections))
    checkpointer.wait_until_finished()
    with open(os.path.join(path, "sd_report.json"), "w") as stream:
        json.dump(json.loads(report_json), stream, indent=1)
