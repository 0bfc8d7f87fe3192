"""Input pipelines: TFDS ArrayRecord data sources read by index into fixed-size numpy batches.

Why plain index-based numpy iteration over `tfds.data_source`, and not grain: the whole state of
an epoch is two integers (epoch, step) plus the seed, so it goes into any checkpoint and a restored
pipeline continues at the exact batch; the order (a seeded permutation per epoch) and the
augmentation draws (one generator per global batch, keyed by (seed, epoch, step)) are functions of
the batch position alone, so batches are bitwise the same for any number of processes or threads;
and it adds no dependency (grain is not installed here).
Since a batch is a pure function of its position, the next `prefetch` batches are made ahead in one
background thread while the caller trains on the current one, and ImageNet-style decoding runs in
one persistent pool of `num_threads` threads (PIL releases the GIL); both live as long as the
pipeline (and its copies), so no pool is made per batch.
The fixed-size datasets (MNIST, Fashion-MNIST, CIFAR) are decoded once and kept in memory as uint8
(CIFAR-10: 150 MB), so on the 2-core CPU an epoch costs only the vectorised crop, flip and
normalisation. With `placement="device"` (or "auto" when the split fits `device_bytes` per device)
they are held on the devices instead and batches are made there (`sd_jax.data.device`): the same
examples in the same order, other augmentation draws (jax.random), global `jax.Array` batches.

Multi-host: `batch_size` is the global batch. Every process computes the same global batch and
takes rows [process_index * b, (process_index + 1) * b) of it, b = batch_size / process_count.

Batches are {"image": float32 (b, h, w, c), "label": int32 (b,)}, or for a text dataset
{"tokens": int32 (b, context), "label": int32 (b, context)} (label: the next byte at each position;
windows are kept in memory and held on the host); evaluation batches add "mask": bool (b,), False on
the rows that pad the last batch to the fixed size. On the device path they are global `jax.Array`s
of the whole batch, split over the mesh's data axis.
"""

from __future__ import annotations

import concurrent.futures
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from sd_jax.data import augment, builders, device, registry, settings

STATE_KEYS = ("epoch", "step", "fingerprint")
DEVICE_BYTES = 1 << 30  # placement="auto": the largest share of a split one device holds
_READ_CHUNK = 4096


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared where the pipeline looks for it."""


def open_split(name: str, split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """The TFDS random-access data source of `split` of dataset `name` (decoded numpy examples)."""
    spec = registry.get(name)
    data_dir = data_dir or builders.default_data_dir()
    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # TFDS raises several types; only "not prepared" is translated
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        if builder.is_prepared():
            raise
        raise DatasetNotFoundError(
            f"dataset {name!r} is not prepared as ArrayRecord in {builder.data_dir}. "
            f"Prepare it with: {builders.command(name, data_dir)}"
        ) from error


class Pipeline:
    """An iterator of fixed-size batches that can save and restore its position.

    Build it with `input_pipeline`. `get_state()` returns a dict of three ints to store in a
    checkpoint; `set_state(state)` on a pipeline built with the same arguments continues at the
    exact next batch (the process count may differ; the global batch is the same). Batches are
    numpy arrays of this process's rows, or global `jax.Array`s when the split is on the devices.
    """

    def __init__(
        self,
        *,
        spec: registry.DatasetSpec,
        source: Sequence[Mapping[str, Any]],
        selection: settings.Selection,
        batch_size: int,
        seed: int,
        training: bool,
        num_epochs: int | None,
        process_index: int,
        process_count: int,
        image_size: int,
        num_threads: int,
        prefetch: int,
        fingerprint: int,
        memory: tuple[np.ndarray, np.ndarray] | None,
        on_device: device.DeviceSplit | None = None,
    ):
        """See `input_pipeline`; `memory` holds the decoded split unless images are streamed;
        `on_device` holds it on the devices when batches are made there."""
        self.spec = spec
        self.selection = selection
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.training = training
        self.image_size = image_size
        self._source = source
        self._memory = memory
        self._seed = seed
        self._num_epochs = num_epochs
        self._process_index = process_index
        self._on_device = on_device
        self._prefetch = prefetch
        self._decoder = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 0 else None
        self._maker = concurrent.futures.ThreadPoolExecutor(1) if prefetch > 0 else None
        self._ahead: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._fingerprint = fingerprint
        self._num_examples = len(selection.indices)
        if training:
            self.steps_per_epoch = self._num_examples // batch_size
        else:
            self.steps_per_epoch = -(-self._num_examples // batch_size)
        self._epoch = 0
        self._step = 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        """Outputs a classifier for this pipeline needs (adaptation, sd_jax rule: the part's classes)."""
        return self.selection.num_classes

    @property
    def num_examples(self) -> int:
        """Examples in one epoch (of all processes together), before dropping the remainder."""
        return self._num_examples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        position = (self._epoch, self._step)
        if not self._within(position):
            raise StopIteration
        made = self._ahead.pop(position, None)
        batch = self._batch(*position) if made is None else made.result()
        self._epoch, self._step = self._after(position)
        self._make_ahead()
        return batch

    def __copy__(self) -> Pipeline:
        """A second cursor over the same data and worker threads, with its own batches made ahead."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin._ahead = {}
        return twin

    def _after(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, step = position
        return (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)

    def _within(self, position: tuple[int, int]) -> bool:
        return self._num_epochs is None or position[0] < self._num_epochs

    def _make_ahead(self) -> None:
        """Start making the next `prefetch` batches in the background; forget any others."""
        if self._maker is None:
            return
        wanted, position = [], (self._epoch, self._step)
        for _ in range(self._prefetch):
            if not self._within(position):
                break
            wanted.append(position)
            position = self._after(position)
        kept = self._forget(keep=wanted)
        self._ahead = {at: kept.get(at) or self._maker.submit(self._batch, *at) for at in wanted}

    def _forget(self, keep: Sequence[tuple[int, int]] = ()) -> dict[tuple[int, int], concurrent.futures.Future]:
        """Cancel the batches made ahead at positions other than `keep` (those not started); return the kept."""
        for position, made in self._ahead.items():
            if position not in keep:
                made.cancel()
        return {position: made for position, made in self._ahead.items() if position in keep}

    def get_state(self) -> dict[str, int]:
        """The position of the next batch, as plain ints (JSON- and Orbax-friendly)."""
        return {"epoch": self._epoch, "step": self._step, "fingerprint": self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state()` result (of a pipeline with the same arguments)."""
        if set(state) != set(STATE_KEYS):
            raise ValueError(
                f"pipeline state has keys {sorted(state)}, expected {list(STATE_KEYS)}; pass the dict "
                "that Pipeline.get_state() returned"
            )
        epoch, step, fingerprint = (int(np.asarray(state[key])) for key in STATE_KEYS)
        if fingerprint != self._fingerprint:
            raise ValueError(
                "pipeline state was saved by a pipeline with other arguments (dataset, split, seed, "
                "batch size, setting or selection differ); restore it into a pipeline built with the "
                "same arguments, or start this one from the beginning"
            )
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"pipeline state epoch={epoch}, step={step} is out of range (steps per epoch: "
                f"{self.steps_per_epoch}); the state is corrupt"
            )
        self._epoch, self._step = epoch, step
        self._ahead = self._forget()

    def _records(self, epoch: int, step: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Split positions of rows first..first+count-1 of global batch (epoch, step), and which of
        those rows hold an example (False where an evaluation batch is padded)."""
        positions = np.arange(step * self.batch_size + first, step * self.batch_size + first + count)
        valid = positions < self._num_examples
        return self.selection.indices[self._epoch_order(epoch)[positions[valid]]], valid

    def _batch(self, epoch: int, step: int) -> dict[str, Any]:
        if self._on_device is not None:
            return self._device_batch(epoch, step)
        local = self.local_batch_size
        first = self._process_index * local
        records, valid = self._records(epoch, step, first, local)
        if self.spec.task == "language_model":
            return self._text_batch(records, valid)
        rng = np.random.default_rng((self._seed, epoch, step))
        if self.spec.augmentation == "imagenet":
            draws = augment.draw_resized_crop(rng, self.batch_size)[first:first + local][valid]
            images, labels = self._load_and_crop(records, draws)
        else:
            images, labels = self._load(records)
            if self.training and self.spec.augmentation == "cifar":
                draws = augment.draw_pad_crop_flip(rng, self.batch_size)[first:first + local]
                images = augment.pad_crop_flip(images, draws[valid])
        out_images = np.zeros((local, self.image_size, self.image_size, self.spec.channels), np.float32)
        out_images[valid] = augment.normalize(images, self.spec.mean, self.spec.std)
        out_labels = np.zeros((local,), np.int32)
        out_labels[valid] = self.selection.label_map[labels]
        batch = {"image": out_images, "label": out_labels}
        if not self.training:
            batch["mask"] = valid
        return batch

    def _text_batch(self, records: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
        """Inputs and next-byte targets of the windows at split positions `records` (padded rows all 0)."""
        windows = np.zeros((len(valid), self.spec.context + 1), np.int32)
        windows[valid] = self._memory[0][records]
        batch = {"tokens": windows[:, :-1], "label": windows[:, 1:]}
        if not self.training:
            batch["mask"] = valid
        return batch

    def _device_batch(self, epoch: int, step: int) -> dict[str, Any]:
        """The whole global batch, made on the devices from the same records as the host path's."""
        records, valid = self._records(epoch, step, 0, self.batch_size)
        padded = np.zeros(self.batch_size, np.int64)
        padded[valid] = records
        batch = self._on_device.batch(padded, valid, epoch, step)
        if self.training:
            del batch["mask"]
        return batch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Positions 0..n-1 in this epoch's order (a seeded permutation when training)."""
        cached = self._order  # read once: the background thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            if self.training:
                order = np.random.default_rng((self._seed, epoch)).permutation(self._num_examples)
            else:
                order = np.arange(self._num_examples)
            cached = self._order = (epoch, order)
        return cached[1]

    def _load(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (n, h, w, c) and original labels (n,) of split positions `records`."""
        images, labels = self._memory
        return images[records], labels[records]

    def _load_and_crop(self, records: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ImageNet-style decode and crop of each record (threads when num_threads > 0)."""
        def one(job: tuple[int, np.ndarray]) -> tuple[np.ndarray, int]:
            index, draw = job
            example = self._source[int(index)]
            image = _image(example)
            if self.training:
                image = augment.random_resized_crop(image, draw, self.image_size)
            else:
                image = augment.center_crop(image, self.image_size)
            return image, int(example["label"])

        results = self._map(one, list(zip(records, draws)))
        if not results:
            return np.zeros((0, self.image_size, self.image_size, self.spec.channels), np.uint8), np.zeros(
                (0,), np.int64)
        return np.stack([r[0] for r in results]), np.asarray([r[1] for r in results], np.int64)

    def _map(self, function: Any, items: Sequence[Any]) -> list[Any]:
        if self._decoder is not None and len(items) > 1:
            return list(self._decoder.map(function, items))
        return [function(item) for item in items]


def _image(example: Mapping[str, Any]) -> np.ndarray:
    image = np.asarray(example["image"])
    return image[:, :, None] if image.ndim == 2 else image


def _read_all(source: Sequence[Mapping[str, Any]], spec: registry.DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a fixed-size split, decoded: uint8 (n, h, w, c) and labels (n,), or for text the
    windows uint8 (n, context + 1) and zero labels."""
    text = spec.task == "language_model"
    shape = (spec.context + 1,) if text else spec.input_shape
    images = np.empty((len(source),) + shape, np.uint8)
    labels = np.empty((len(source),), np.int64)
    for start in range(0, len(source), _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, len(source))))
        try:  # one ArrayRecord read per chunk: about 25x faster than reading record by record
            examples = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data (TFDS 4.9.10) cannot serve __getitems__
            examples = [source[key] for key in keys]
        for index, example in zip(keys, examples):
            image = np.asarray(example["tokens"]) if text else _image(example)
            if image.shape != shape:
                raise ValueError(
                    f"dataset {spec.name!r}: example {index} has shape {image.shape}, expected {shape}; "
                    "the prepared data do not match the dataset, re-prepare it"
                )
            images[index] = image
            labels[index] = 0 if text else int(example["label"])
    return images, labels


def input_pipeline(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    training: bool | None = None,
    setting: str = "plain",
    part: str = "source",
    split_seed: int = 0,
    source_classes: int | None = None,
    split_rule: str = "sd_jax",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_threads: int = 0,
    prefetch: int = 2,
    placement: str = "host",
    device_bytes: int = DEVICE_BYTES,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Pipeline:
    """A resumable batch iterator over `split` ("train", "test", "validation" or "eval", the
    dataset's evaluation split) of dataset `name` (see `registry.names()`).

    training (default: split is the training split): shuffle each epoch, augment, drop the
    remainder, repeat forever unless `num_epochs`; otherwise one pass in order, the last batch
    padded (see "mask"). `batch_size` is global; `process_index`/`process_count` default to JAX's.
    setting/part/split_seed/source_classes/split_rule: the paper's settings and how their parts are
    drawn ("sd_jax" or "reference", the authors' splits; `sd_jax.data.settings`).
    `image_size` applies to ImageNet-style crops only. `data_dir`: prepared data (default
    `SD_JAX_DATA_DIR`, else TFDS's default folder).
    num_threads: ImageNet-style decoding threads (0: in the thread that makes the batch);
    prefetch: batches made ahead in a background thread (0: made when asked for).
    placement: "host" (numpy batches, each process its rows), "device" (a fixed-size split held on
    the devices of `mesh`, default all devices, split along `data_axis`; global `jax.Array`
    batches) or "auto" (device when each device's share of the split is at most `device_bytes`).
    """
    spec = registry.get(name)
    split = spec.eval_split if split == "eval" else split
    if split not in (spec.train_split, spec.eval_split):
        raise ValueError(
            f"dataset {name!r} has splits {spec.train_split!r} and {spec.eval_split!r} (or 'eval'), "
            f"not {split!r}"
        )
    is_train_split = split == spec.train_split
    training = is_train_split if training is None else training
    if process_index is None or process_count is None:
        import jax  # only for the defaults, so that the data layer does not need a backend

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in 0..process_count-1 (process_count={process_count})"
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count} "
            "(it is the global batch, split evenly between processes)"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be at least 1 (or None to repeat forever)")
    settings.check(setting, part, split_rule)
    if num_threads < 0 or prefetch < 0:
        raise ValueError(f"num_threads={num_threads} and prefetch={prefetch} must be 0 (off) or more")
    if placement not in device.PLACEMENTS:
        raise ValueError(f"placement={placement!r}; pick one of {', '.join(device.PLACEMENTS)}")
    if placement == "device" and spec.augmentation == "imagenet":
        raise ValueError(f"dataset {name!r} has images of any size, decoded batch by batch, so it cannot be held "
                         "on the devices; use placement='host' (or 'auto')")
    if image_size is None:
        image_size = spec.image_size
    elif spec.augmentation != "imagenet" and image_size != spec.image_size:
        raise ValueError(
            f"dataset {name!r} has {spec.image_size}x{spec.image_size} images and is not resized; "
            f"drop image_size={image_size}"
        )
    if spec.task == "language_model":
        if setting == "adaptation":
            raise ValueError(f"dataset {name!r} is text (next-byte targets, no classes to split); use the "
                             "'plain' or 'finetune' setting")
        if placement == "device":
            raise ValueError(f"dataset {name!r} is text, made into batches on the host; use placement='host' "
                             "(or 'auto')")
        placement = "host"
    if setting == "adaptation" and spec.augmentation == "imagenet":
        raise ValueError(
            f"the adaptation setting reads every label up front and is meant for CIFAR-sized data; "
            f"use it with cifar10, cifar100 or cifar10_jpeg, not {name!r}"
        )

    source = open_split(name, split, data_dir)
    memory = None if spec.augmentation == "imagenet" else _read_all(source, spec)
    selection = settings.select(
        len(source),
        num_classes=spec.num_classes,
        setting=setting,
        part=part,
        seed=split_seed,
        source_classes=spec.source_classes if source_classes is None else source_classes,
        is_train_split=is_train_split,
        labels=None if memory is None else memory[1],
        split_rule=split_rule,
    )
    if training and len(selection.indices) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {len(selection.indices)} examples selected "
            f"from {name!r} {split!r} (setting {setting!r}, part {part!r}); no full batch can be made"
        )
    if not len(selection.indices):
        raise ValueError(f"no examples selected from {name!r} {split!r} (setting {setting!r}, part {part!r})")
    identity = [name, split, batch_size, seed, training, setting, part, split_seed, source_classes,
                image_size, len(source), zlib.crc32(selection.indices.astype(np.int64).tobytes())]
    if split_rule != "sd_jax":  # appended only then, so that states saved before split_rule still resume
        identity.append(split_rule)
    on_device = None if memory is None else device.place(
        *memory, selection.label_map, placement=placement, mesh=mesh, axis=data_axis, device_bytes=device_bytes,
        batch_size=batch_size, seed=seed, augmented=training and spec.augmentation == "cifar", mean=spec.mean,
        std=spec.std)
    if on_device is not None:
        identity.append("device")  # other augmentation draws: a host state does not resume here
    fingerprint = zlib.crc32(json.dumps(identity).encode())
    return Pipeline(
        spec=spec, source=source, selection=selection, batch_size=batch_size, seed=seed,
        training=training, num_epochs=1 if num_epochs is None and not training else num_epochs,
        process_index=process_index, process_count=process_count, image_size=image_size,
        num_threads=num_threads, prefetch=0 if on_device else prefetch, fingerprint=fingerprint,
        memory=None if on_device else memory, on_device=on_device,
    )
