"""Variable trees to and from `.npz` files and Orbax checkpoints, on any `etils.epath` backend; never pickle.

`load_variables` takes an Orbax checkpoint directory (a `StandardCheckpointer` save, or a
`CheckpointManager` root, whose latest step is read; for a training checkpoint of `sd_jax.train`, its
variable collections) or an `.npz` whose keys are slash-joined paths ("params/block0/conv1/kernel").
`load_params` gives the "params" collection of such a tree. Writes are atomic.

SD variables have one layout on disk, the one the SD layers read (`sd_jax.nn.layers`):
`sd_basis/<layer>/basis`, `sd_coeff/<layer>/coeff`, `sd_mask/<layer>/mask`, beside `params`.
A damaged file is refused with one line naming it (`CheckpointError`); of a `CheckpointManager` root
whose newest step is damaged, the newest step that restores is read, with a warning.
`save_decomposition` writes a decomposition in it, so an SD model applies the file as it is. Files of
the earlier layout (`sd_coeff/<layer>/kernel`, written by `--mode=decompose` before 2026-11-30) are
converted on load.
"""

from __future__ import annotations

import json
import logging
import textwrap
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sd_jax.core import report as report_lib
from sd_jax.core.network import NetworkDecomposition, path_name
from sd_jax.io.files import PathLike, as_path, atomic_write
from sd_jax.nn.convert import sd_variables
from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_MASK

REPORT_KEY = "__report__"  # the decomposition report inside an .npz (a JSON string)
REPORT_FILE = "sd_report.json"  # the same beside an Orbax save
# The leaf name of each SD collection in the layers' layout.
SD_LEAVES = {SD_BASIS: "basis", SD_COEFF: "coeff", SD_MASK: "mask"}


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


def load_variables(path: PathLike) -> dict[str, Any]:
    """The tree stored at `path` (.npz file or Orbax checkpoint directory); for a training
    checkpoint of `sd_jax.train` (items "state" and "data"), its variable collections."""
    where = as_path(path)
    if not where.exists():
        raise CheckpointError(
            f"{path}: no such file or directory; pass an .npz of parameters or an Orbax checkpoint directory"
        )
    tree = _load_orbax(where) if where.is_dir() else _load_npz(where)
    state = tree.get("state") if isinstance(tree, Mapping) else None
    if isinstance(state, Mapping) and "trainable" in state:
        tree = {**state["trainable"], **state.get("frozen", {})}
    if not jax.tree.leaves(tree):
        raise CheckpointError(f"{path}: the checkpoint holds no arrays")
    return upgrade_sd_layout(tree, str(path))


def upgrade_sd_layout(tree: Any, source: str) -> Any:
    """`tree` with SD collections of the earlier layout (`sd_coeff/<layer>/kernel`) renamed to the layers'
    (`sd_coeff/<layer>/coeff`); raises CheckpointError for a per-row scale, which SD layers cannot hold."""
    if not isinstance(tree, Mapping):
        return tree
    if "sd_row_scale" in tree:
        raise CheckpointError(f"{source}: decomposed with row_scale=True, but SD layers store no per-row scale; "
                              "decompose the dense parameters again without row_scale")
    upgraded = dict(tree)
    for collection, leaf in SD_LEAVES.items():
        flat = flatten(tree[collection]) if isinstance(tree.get(collection), Mapping) else {}
        if any(key.endswith("/kernel") for key in flat):  # else left as it is, nesting included
            upgraded[collection] = unflatten({
                (key.removesuffix("kernel") + leaf if key.endswith("/kernel") else key): value
                for key, value in flat.items()})
    return upgraded


def check_fits(expected: Any, got: Any, source: str, *, what: str, fix: str) -> None:
    """Raise CheckpointError when the leaf paths and shapes of `got` differ from those of `expected` (a
    model's variables or their ShapeDtypeStructs): `what` says what does not fit, `fix` how to fix it."""
    want = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    missing = sorted(set(want) - set(have))
    unknown = sorted(set(have) - set(want))  # e.g. the extra blocks of a deeper ResNet
    wrong = sorted(key for key in set(want) & set(have) if want[key] != have[key])
    if missing or unknown or wrong:
        raise CheckpointError(f"{source}: {what} (missing {missing[:3]}, not in the model {unknown[:3]}, "
                              f"wrong shapes {wrong[:3]}); {fix}")


def check_finite(tree: Any, source: str) -> Any:
    """`tree` itself when every floating-point leaf is finite; else CheckpointError naming the first
    non-finite leaf ("params/stage1_block0/conv1/kernel"), how many of its values, and `source`.

    Loaded weights are checked before use: a NaN weight otherwise trains on at chance accuracy with a
    finite loss, and decomposes or exports without a word."""
    bad = {name: int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf))) for name, leaf in flatten(tree).items()
           if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)}  # bfloat16 included
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        name, count = next(iter(bad.items()))
        others = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{source}: {name} holds {count} non-finite values (NaN or inf){others}; the weights diverged or the "
            "file is damaged: pass a checkpoint saved before the run diverged, or retrain")
    return tree


def load_params(path: PathLike) -> dict[str, Any]:
    """The parameter tree stored at `path`: its "params" collection when it has one."""
    tree = load_variables(path)
    if isinstance(tree, Mapping) and "params" in tree and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    return tree


def _cause(error: BaseException) -> str:
    """`error` as a short phrase for a one-line message: its first line without TensorStore's spec."""
    text = str(error).split("\n", 1)[0].split(" [tensorstore_spec", 1)[0]
    return f"{type(error).__name__}: {textwrap.shorten(text, 160, placeholder=' ...')}"


def _load_npz(path: Any) -> dict[str, Any]:
    try:
        with path.open("rb") as stream, np.load(stream, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files if not key.startswith("__")}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise CheckpointError(
            f"{path}: not a readable .npz ({_cause(error)}); the file is corrupt, truncated or holds pickled "
            "objects (not allowed): copy it again or re-export it with numpy.savez"
        ) from None
    return unflatten(flat)


def _load_orbax(path: Any) -> Any:
    """A StandardCheckpointer save at `path`, or the newest step of a CheckpointManager root that restores."""
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    checkpointer = ocp.StandardCheckpointer()
    steps = sorted((int(child.name) for child in path.iterdir() if child.name.isdigit()), reverse=True)
    if not steps:
        try:
            return _restore_here(checkpointer, path)
        except Exception as error:  # Orbax raises many types for a damaged directory
            raise CheckpointError(
                f"{path}: cannot restore the Orbax checkpoint ({_cause(error)}); the directory is damaged or not "
                "a complete StandardCheckpointer or CheckpointManager save: save or copy it again") from None
    causes = []
    for step in steps:
        try:
            tree = _restore_step(checkpointer, path / str(step))
        except Exception as error:  # as above
            causes.append(_cause(error))
            continue
        if causes:
            logging.warning("%s: step %d does not restore (damaged: %s); reading step %d instead", path, steps[0],
                            causes[0], step)
        return tree
    raise CheckpointError(f"{path}: no checkpoint step restores (step {steps[0]}: {causes[0]}); the checkpoints "
                          "are damaged: pass another run's checkpoints or a saved .npz")


def _restore_step(checkpointer: Any, step_dir: Any) -> Any:
    """The items of one CheckpointManager step: its "default" item, or for a training checkpoint its "state"
    (its "data" item is the input position, not arrays)."""
    items = sorted(child.name for child in step_dir.iterdir() if child.is_dir() and not child.name.startswith("_"))
    if items == ["default"]:
        return _restore_here(checkpointer, step_dir / "default")
    if "state" in items:
        items = ["state"]
    return {item: _restore_here(checkpointer, step_dir / item) for item in items}


def _restore_here(checkpointer: Any, directory: Any) -> Any:
    """Restore every array onto this process's first device, whatever topology saved it (several
    processes, another mesh): Orbax refuses a sharded checkpoint of another topology without a target."""
    import orbax.checkpoint as ocp

    # the handler's metadata: StandardCheckpointer.metadata warns that an item has no step metadata file
    tree = ocp.StandardCheckpointHandler().metadata(directory)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
                          if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf, tree)
    return checkpointer.restore(directory, target)


def atomic_savez(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez of `arrays` to a temporary sibling of `path`, then renamed over it."""
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def save_variables(path: PathLike, variables: Mapping[str, Any], *, report_json: str | None = None) -> None:
    """Write variable collections to `path`: an `.npz` (keys 'collection/layer/leaf') or an Orbax
    directory; `report_json` goes beside them (the .npz key `__report__`, or `sd_report.json`)."""
    target = as_path(path)
    if target.name.endswith(".npz"):
        arrays = flatten(variables)
        if report_json is not None:
            arrays[REPORT_KEY] = np.array(report_json)
        atomic_savez(target, arrays)
        return
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, jax.tree.map(np.asarray, dict(variables)))
    checkpointer.wait_until_finished()
    if report_json is not None:
        atomic_write(target / REPORT_FILE, lambda stream: json.dump(json.loads(report_json), stream, indent=1),
                     mode="w")


def save_decomposition(path: PathLike, result: NetworkDecomposition) -> None:
    """Write the variables of the SD model `result` describes (`sd_jax.nn.convert.sd_variables`: the
    layers' layout) and the JSON report to `path` (.npz file or Orbax directory)."""
    save_variables(path, sd_variables(result.tree), report_json=report_lib.to_json(result.reports,
                                                                                 result.dense_params))
