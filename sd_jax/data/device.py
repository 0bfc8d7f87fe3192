"""Device-resident splits: a fixed-size dataset held as uint8 in device memory, batches made there.

Why: for MNIST-like and CIFAR data the host path spends its time copying, cropping and normalising
float32 batches and moving them to the device every step. Here the decoded split is moved to the
devices once (uint8, split along the mesh's data axis, so each of d devices holds 1/d of it), and
one jitted function gathers a batch by index, crops and flips it (CIFAR augmentation, jax.random
with a key folded from (seed, epoch, step)), normalises it and looks its labels up. Only the batch's
example indices (int32) travel from the host each step; they come from the host pipeline's epoch
order, so both paths visit the same examples in the same order and the position stays (epoch, step).
Every array is global and the whole global batch is computed at once, so batches do not depend on
the process or device count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sd_jax.data import augment

PLACEMENTS = ("host", "device", "auto")


def pad_crop_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """CIFAR augmentation on the device: zero-pad by `augment.CIFAR_PAD`, crop back at random
    offsets, flip half of the images left-right. images: uint8 (b, h, w, c)."""
    b, h, w, c = images.shape
    pad = augment.CIFAR_PAD
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (b, 2), 0, 2 * pad + 1)  # (b, [y, x])
    flips = jax.random.bernoulli(flip_key, shape=(b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = jax.vmap(lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), (h, w, c)))(padded, offsets)
    return jnp.where(flips[:, None, None, None], crop[:, :, ::-1], crop)


def assemble(images: jax.Array, labels: jax.Array, label_map: jax.Array, records: jax.Array, valid: jax.Array,
             position: jax.Array, *, seed: int, augmented: bool, mean: tuple[float, ...],
             std: tuple[float, ...]) -> dict[str, jax.Array]:
    """One batch from a device-resident split: rows `records` (b,) of `images` (n, h, w, c) uint8
    and `labels` (n,), augmented with a key folded from `seed` and `position` = (epoch, step) when
    `augmented`, normalised to float32; labels mapped by `label_map`; rows where `valid` is False
    are zeros (they pad an evaluation batch)."""
    batch = images[records]
    if augmented:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), position[0]), position[1])
        batch = pad_crop_flip(batch, key)
    scale, shift = augment.normalization(mean, std)
    batch = batch.astype(jnp.float32) * scale - shift
    return {"image": jnp.where(valid[:, None, None, None], batch, 0.0),
            "label": jnp.where(valid, label_map[labels[records]], 0).astype(jnp.int32)}


def place(images: np.ndarray, labels: np.ndarray, label_map: np.ndarray, *, placement: str, mesh: Mesh | None,
          axis: str, device_bytes: int, batch_size: int, **options) -> DeviceSplit | None:
    """The split on the devices of `mesh` (default: all, one axis `axis`) when `placement` is "device",
    or "auto" and each device's share of `images` takes at most `device_bytes` and the batch divides over
    the devices; else None (host).
    `options` go to `DeviceSplit`."""
    if placement == "host":
        return None
    mesh = Mesh(np.array(jax.devices()), (axis,)) if mesh is None else mesh
    devices = mesh.shape[axis]
    if placement == "auto" and (images.nbytes / devices > device_bytes or batch_size % devices):
        return None
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} does not divide over the {devices} devices that hold the "
                         f"data; pass a multiple of {devices}")
    return DeviceSplit(images, labels, label_map, mesh=mesh, axis=axis, **options)


class DeviceSplit:
    """A decoded split on the devices of `mesh`, split along `axis`, and the jitted batch maker."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, label_map: np.ndarray, *, mesh: Mesh, axis: str,
                 seed: int, augmented: bool, mean: tuple[float, ...], std: tuple[float, ...]):
        """images: uint8 (n, h, w, c); labels: (n,) original labels; label_map: original -> trained label."""
        devices = mesh.shape[axis]
        padding = -len(images) % devices  # rows that make the split divide over the devices; never read
        self._split = NamedSharding(mesh, PartitionSpec(axis))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.images = _put(np.concatenate([images, np.zeros((padding,) + images.shape[1:], np.uint8)]), self._split)
        self.labels = _put(np.concatenate([labels, np.zeros(padding, labels.dtype)]).astype(np.int32), self._split)
        self.label_map = _put(np.asarray(label_map, np.int32), self._replicated)
        self._assemble = jax.jit(
            functools.partial(assemble, seed=seed, augmented=augmented, mean=mean, std=std),
            out_shardings={"image": self._split, "label": self._split})

    def batch(self, records: np.ndarray, valid: np.ndarray, epoch: int, step: int) -> dict[str, jax.Array]:
        """The global batch of split rows `records` (b,), b a multiple of the device count, made for
        position (epoch, step), with "mask" = `valid` (False on rows that pad an evaluation batch)."""
        valid_on_device = _put(valid, self._split)
        out = self._assemble(self.images, self.labels, self.label_map, _put(records.astype(np.int32), self._split),
                             valid_on_device, _put(np.array([epoch, step], np.int32), self._replicated))
        return dict(out, mask=valid_on_device)


def _put(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """`value` (the same on every process) as a global array placed by `sharding`."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
