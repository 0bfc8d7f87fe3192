"""Packed SD models back into runnable ones: `save` an SD model into a packed file, `load` it as a
`ServedModel` whose `apply(images)` gives the trained model's logits (docs/serving.md).

A packed file (`sd_jax.core.packing`, format version 2) holds, under flat names
`<collection>/<module path>/<leaf>`:
    params/<layer>/kernel     every SD kernel, bit-packed: q(C) ⊙ mask as sign and exponent codes, and B
    params/...                biases, batch-norm scales, dense kernels, as they are
    batch_stats/..., ...      every other collection of the model (batch-norm statistics, activation ranges)
and, in its metadata under "model", a `ModelDescription`: the zoo model and its options, the SD rules
(a config's `sd` section), the input shape and the keyword arguments of inference.

Loading places each SD kernel in the layer's collections: C as the coefficients the layer used
(q(C) ⊙ mask), its non-zero pattern as the mask, and B. A 'latent' layer quantizes them again, which
leaves a power of two at or above its smallest magnitude unchanged, so the rebuilt kernels, and with
them the logits, are bit for bit those of the trained model (B stored as float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import io as sd_io
from sd_jax import models
from sd_jax.core import packing
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import path_name
from sd_jax.nn import convert
from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_COLLECTIONS, SD_MASK
from sd_jax.nn.rules import SDRules
from sd_jax.serve import integer
from sd_jax.serve.integer import IntegerModel

METADATA_KEY = "model"  # where the ModelDescription lives in a packed file's metadata
INFERENCE = {"train": False}  # what the zoo models' apply takes for inference
REQUIRED = ("params", *SD_COLLECTIONS)  # collections without which no model runs


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What rebuilds a packed model.

    name: the zoo model (`sd_jax.models.get`), None for a user's own model (then `load` needs `model=`);
    num_classes and options: its `models.get` arguments; sd: the SD rules as a config's `sd` section
    (`SDRules.as_section`); input_shape: one input with its batch axis, (1, height, width, channels);
    apply_kwargs: the keyword arguments of the model's apply for inference.
    """

    name: str | None
    num_classes: int | None
    input_shape: tuple[int, ...]
    sd: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(INFERENCE))

    def rules(self) -> SDRules:
        """The SD rules the model was built with."""
        return SDRules.from_config({"sd": dict(self.sd)})

    def build(self, source: str = "the description") -> Any:
        """The zoo model in SD form; ValueError naming `source` for a user's own model."""
        if self.name is None:
            raise ValueError(f"{source}: holds a user's own model, which sd_jax cannot rebuild; pass it as "
                             "load(path, model=swap_layers(YourModel(...), rules))")
        return models.get(self.name, num_classes=self.num_classes, sd=self.rules(), **self.options)

    def sample(self) -> jax.Array:
        """Zeros of the input shape: what traces the model."""
        return jnp.zeros(self.input_shape, jnp.float32)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> "ModelDescription":
        """The description `to_json` wrote; PackingError naming `source` when it is malformed."""
        try:
            return cls(**dict(data, input_shape=tuple(data["input_shape"])))
        except (TypeError, KeyError) as error:
            raise packing.PackingError(f"{source}: the model description is malformed ({error}); export the model "
                                       "again") from None


def model_tensors(tree: Any, collections: Mapping[str, Any]) -> dict[str, packing.SDTensor | np.ndarray]:
    """What a packed model holds: 'params/<path>' for every leaf of `tree` (a parameter tree whose SD kernels
    are `Decomposition`s), SD kernels bit-packed, and '<collection>/<path>' for every leaf of the other
    `collections` (params and SD collections are taken from `tree` instead)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition))[0]
    tensors = {f"params/{path_name(path)}": packing.SDTensor.from_decomposition(leaf)
               if isinstance(leaf, Decomposition) else np.asarray(leaf) for path, leaf in leaves}
    others = {name: tree for name, tree in collections.items() if name not in REQUIRED}
    tensors.update(sd_io.flatten(others))
    return tensors


def pack_model(tensors: Mapping[str, packing.SDTensor | np.ndarray], description: ModelDescription, *,
               basis_dtype: str = "float32") -> bytes:
    """The packed file's bytes: `tensors` (`model_tensors`) with `description` in the metadata."""
    return packing.pack(tensors, basis_dtype=basis_dtype, metadata={METADATA_KEY: description.to_json()})


def save(path: str, model: Any, variables: Mapping[str, Any], description: ModelDescription, *,
         basis_dtype: str = "float32") -> int:
    """Pack an SD model's `variables` with its `description` into `path` (atomically); returns the bytes
    written. `model` is the SD model (zoo or `swap_layers`); basis_dtype 'float16' halves B's bytes but is
    lossy, so only 'float32' serves the trained logits bit for bit."""
    tree = convert.sd_tree(model, dict(variables), description.sample(), **description.apply_kwargs)
    data = pack_model(model_tensors(tree, variables), description, basis_dtype=basis_dtype)
    sd_io.atomic_write(path, lambda stream: stream.write(data))
    return len(data)


def _as_variables(tensors: Mapping[str, packing.SDTensor | np.ndarray], source: str) -> dict[str, Any]:
    """Flax variables from a packed file's tensors: each SD kernel 'params/<layer>/kernel' becomes the layer's
    C (q(C) ⊙ mask), mask (its non-zeros) and B."""
    flat: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, packing.SDTensor):
            flat[name] = tensor
            continue
        collection, _, layer = name.removesuffix("/kernel").partition("/")
        if collection != "params" or not name.endswith("/kernel") or tensor.row_scale is not None:
            raise packing.PackingError(f"{source}: SD tensor {name!r} is not a layer's kernel without row scale "
                                       "('params/<layer>/kernel'); pack it with sd_jax.serve.save")
        flat[f"{SD_COEFF}/{layer}/coeff"] = tensor.coeff
        flat[f"{SD_MASK}/{layer}/mask"] = tensor.coeff != 0
        flat[f"{SD_BASIS}/{layer}/basis"] = tensor.basis
    return sd_io.unflatten(flat)


# The integer model is an argument (a pytree): every ServedModel of one graph shares the compilation.
_apply_integer = jax.jit(IntegerModel.apply)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A packed SD model ready for inference: `apply(images)` (jitted, evaluation mode) gives logits.

    `apply_int(images)` runs the integer-only form (`sd_jax.serve.integer`) once one is attached: built
    from calibration images with `quantized(images)`, or read back with `with_integer_model(integer.load(path))`.
    """

    model: Any
    variables: Mapping[str, Any]
    description: ModelDescription
    integer_model: IntegerModel | None = None
    _apply: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kwargs = dict(self.description.apply_kwargs)
        object.__setattr__(self, "_apply", jax.jit(lambda variables, images: self.model.apply(
            variables, images, **kwargs)))

    def check_images(self, images: Any) -> jax.Array:
        """`images` as an array; ValueError naming the expected shape when they do not fit the model."""
        images = jnp.asarray(images)
        expected = tuple(self.description.input_shape[1:])
        if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not fit the model's input "
                             f"(batch, {', '.join(map(str, expected))}); pass a batch of such images")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images are {images.dtype}; pass them as floats, preprocessed as in training")
        return images

    def apply(self, images: Any) -> jax.Array:
        """Logits (batch, classes) of the float SD model."""
        return self._apply(self.variables, self.check_images(images))

    def apply_int(self, images: Any) -> jax.Array:
        """Logits of the attached integer-only model (jitted); ValueError when none is attached."""
        if self.integer_model is None:
            raise ValueError("this ServedModel has no integer model; build one from calibration images with "
                             "served = served.quantized(images), or attach a saved one with "
                             "served.with_integer_model(sd_jax.serve.integer.load(path))")
        return _apply_integer(self.integer_model, self.check_images(images))

    def with_integer_model(self, integer_model: IntegerModel) -> "ServedModel":
        """A copy whose `apply_int` runs `integer_model`."""
        return dataclasses.replace(self, integer_model=integer_model)

    def quantized(self, calibration_images: Any) -> "ServedModel":
        """A copy whose `apply_int` runs the integer-only form calibrated on `calibration_images`
        (preprocessed as in training; a few hundred training images)."""
        return self.with_integer_model(integer.quantize(self.model, self.variables, self.check_images(calibration_images)))


def _description(packed: packing.Packed, path: str, model: Any, input_shape: tuple[int, ...] | None,
                 apply_kwargs: Mapping[str, Any] | None) -> ModelDescription:
    if METADATA_KEY in packed.metadata:
        description = ModelDescription.from_json(packed.metadata[METADATA_KEY], path)
    elif model is None or input_shape is None:
        raise packing.PackingError(
            f"{path}: format version {packed.version} without a model description; export it again with "
            f"--mode=export (format version {packing.FORMAT_VERSION}) or sd_jax.serve.save, or pass the model "
            "and its input: load(path, model=..., input_shape=(1, height, width, channels))")
    else:
        description = ModelDescription(None, None, tuple(input_shape))
    changes: dict[str, Any] = {}
    if input_shape is not None:
        changes["input_shape"] = tuple(input_shape)
    if apply_kwargs is not None:
        changes["apply_kwargs"] = dict(apply_kwargs)
    return dataclasses.replace(description, **changes)


def load(path: str, *, model: Any = None, input_shape: tuple[int, ...] | None = None,
         apply_kwargs: Mapping[str, Any] | None = None) -> ServedModel:
    """The model packed at `path`, ready to serve.

    The file's magic, format version and checksum are checked (PackingError naming what is wrong). The
    model is rebuilt from the file's description, or is `model` (e.g. a user's `swap_layers` model, or a
    version-1 file's zoo model, which then needs `input_shape`); the file's variables must fit it
    (CheckpointError naming the leaves that do not). `apply_kwargs` overrides the description's.
    """
    packed = packing.read(path)
    description = _description(packed, path, model, input_shape, apply_kwargs)
    model = description.build(path) if model is None else model
    variables = _as_variables(packed.tensors, path)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), description.sample(), **description.apply_kwargs))
    missing = sorted(name for name in template if name not in variables)
    if missing:
        raise sd_io.CheckpointError(f"{path}: the model needs the collections {missing}, which the file lacks; "
                                    "export from a checkpoint that holds them (a training checkpoint does)")
    sd_io.check_fits(template, variables, path, what="the packed variables do not fit the model",
                     fix="pass the model they were exported from (load(path, model=...)) or export again")
    return ServedModel(model, jax.device_put(variables), description)
