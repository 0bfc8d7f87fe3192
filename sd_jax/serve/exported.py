"""Served models for other runtimes: a `jax.export` artifact that runs without sd_jax (docs/serving.md).

`export_artifact(served, path)` writes two files, each atomically:
    path         the serialized `jax.export.Exported` (StableHLO with the model's variables as constants)
    path.json    {"format": "sd_jax.exported", "version", "input_shape" (batch None when symbolic),
                  "input_dtype", "path_kind", "platforms", "model": the ModelDescription}
Any program with jax (and numpy) runs it: `jax.export.deserialize(bytearray(data)).call(images)`.
`export_function` exports any function of one image batch the same way, e.g. an integer model's apply.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sd_jax import io as sd_io
from sd_jax.serve.packed import ServedModel

ARTIFACT_FORMAT = "sd_jax.exported"
ARTIFACT_VERSION = 1
PATH_KINDS = ("float", "int")
SIDECAR_SUFFIX = ".json"


@contextlib.contextmanager
def _serialization() -> Iterator[None]:
    """Name the fix when jax's serialization lacks its optional flatbuffers package."""
    try:
        yield
    except ImportError as error:
        raise ImportError(f"{error}; install it with pip install -r requirements.txt") from None


def export_function(fn: Callable[[jax.Array], jax.Array], path: str, *, input_shape: Sequence[int],
                    input_dtype: str = "float32", batch_size: int | None = None,
                    platforms: Sequence[str] | None = None,
                    info: Mapping[str, Any] | None = None) -> jax.export.Exported:
    """Export `fn(images)` (traceable by jax) for images (batch, *input_shape) to `path` and its sidecar.

    batch_size None exports a symbolic batch (any size at call time); platforms None: the default backend
    ('cpu', 'cuda', 'tpu'). `info` joins the sidecar.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1, or None for any batch size")
    batch = jax.export.symbolic_shape("batch") if batch_size is None else (batch_size,)
    images = jax.ShapeDtypeStruct((*batch, *input_shape), jnp.dtype(input_dtype))
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(images)
    with _serialization():
        data = exported.serialize()
    sidecar = dict(info or {}, format=ARTIFACT_FORMAT, version=ARTIFACT_VERSION,
                   input_shape=[batch_size, *input_shape], input_dtype=str(jnp.dtype(input_dtype)),
                   platforms=list(exported.platforms))
    sd_io.atomic_write(path, lambda stream: stream.write(data))
    sd_io.atomic_write_text(path + SIDECAR_SUFFIX, json.dumps(sidecar, indent=1))
    return exported


def export_artifact(served: ServedModel, path: str, *, batch_size: int | None = None, path_kind: str = "float",
                    platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Export `served.apply` (path_kind 'float') or `served.apply_int` ('int', needs an integer model
    attached) to `path`; see `export_function`."""
    if path_kind not in PATH_KINDS:
        raise ValueError(f"path_kind={path_kind!r} is not one of {PATH_KINDS}")
    if path_kind == "int" and served.integer_model is None:
        raise ValueError("path_kind='int' needs an integer model; attach one with served.with_integer_model(...)")
    fn = served.apply if path_kind == "float" else served.apply_int
    return export_function(fn, path, input_shape=served.description.input_shape[1:], batch_size=batch_size,
                           platforms=platforms,
                           info=dict(path_kind=path_kind, model=served.description.to_json()))


def load_artifact(path: str) -> tuple[jax.export.Exported, dict[str, Any]]:
    """(the exported function, its sidecar) written by `export_function`; ValueError naming the file when
    the sidecar is missing, of another format or of a newer version."""
    try:
        sidecar = json.loads(sd_io.as_path(path + SIDECAR_SUFFIX).read_text())
        data = sd_io.as_path(path).read_bytes()
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the artifact and its {SIDECAR_SUFFIX} sidecar ({error}); pass the "
                         "path export_artifact wrote") from None
    if sidecar.get("format") != ARTIFACT_FORMAT or not isinstance(sidecar.get("version"), int):
        raise ValueError(f"{path}{SIDECAR_SUFFIX}: not an {ARTIFACT_FORMAT} sidecar; pass the path "
                         "export_artifact wrote")
    if sidecar["version"] > ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact version {sidecar['version']} is newer than this reader's "
                         f"{ARTIFACT_VERSION}; update sd_jax")
    with _serialization():
        try:
            return jax.export.deserialize(bytearray(data)), sidecar
        except ImportError:
            raise
        except Exception as error:  # flatbuffers raises errors of many kinds on damaged bytes
            raise ValueError(f"{path}: the serialized function is damaged ({type(error).__name__}: {error}); "
                             "export it again") from None
