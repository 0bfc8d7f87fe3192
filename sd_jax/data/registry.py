"""Datasets by name: what each one is, how big its images are, and how it is normalised and augmented.

The built-in TFDS names (`cifar10`, `cifar100`, `imagenet2012`, `mnist`, `fashion_mnist`) are the
normal path for users with internet. `cifar10_jpeg` and `fashion_mnist_idx` are the offline copies,
built by the local builders in `sd_jax.data.builders` (see `python -m sd_jax.data.prepare --help`).
`fortunes_chars` is a text dataset (task "language_model"): windows of bytes, next-byte targets.
"""

from __future__ import annotations

import dataclasses

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)

FORTUNES_CONTEXT = 128  # bytes a fortunes_chars example predicts from (its window holds one more)
TASKS = ("classification", "language_model")

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its TFDS name, image geometry, classes, normalisation and augmentation.

    `augmentation` is "cifar" (4-pixel pad, random crop, flip), "imagenet" (random-resized crop and
    flip; resize and center crop for evaluation; images of any size, decoded batch by batch) or
    "none". Datasets without "imagenet" augmentation have fixed-size images and are decoded once
    and kept in memory as one uint8 array.
    `source_classes` is the size of the source half in the adaptation setting.
    `task`: "classification" (batches of "image" and "label") or "language_model" (batches of "tokens",
    int32 (b, context), and "label", the next byte at each position; `num_classes` is the vocabulary,
    the image fields are unused).
    """

    name: str
    tfds_name: str
    image_size: int
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str
    train_split: str
    eval_split: str
    source_classes: int
    local: bool = False
    task: str = "classification"
    context: int = 0

    @property
    def input_key(self) -> str:
        """The batch entry a model takes: "image" or, for text, "tokens"."""
        return "tokens" if self.task == "language_model" else "image"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input without the batch axis: (height, width, channels) or, for text, (context,)."""
        if self.task == "language_model":
            return (self.context,)
        return (self.image_size, self.image_size, self.channels)


_SPECS = {
    spec.name: spec
    for spec in (
        DatasetSpec("cifar10", "cifar10", 32, 3, 10, _CIFAR10_MEAN, _CIFAR10_STD, "cifar",
                    "train", "test", 5),
        DatasetSpec("cifar100", "cifar100", 32, 3, 100, (0.5071, 0.4865, 0.4409),
                    (0.2673, 0.2564, 0.2762), "cifar", "train", "test", 90),
        DatasetSpec("imagenet2012", "imagenet2012", 224, 3, 1000, (0.485, 0.456, 0.406),
                    (0.229, 0.224, 0.225), "imagenet", "train", "validation", 500),
        DatasetSpec("mnist", "mnist", 28, 1, 10, (0.1307,), (0.3081,), "none",
                    "train", "test", 5),
        DatasetSpec("fashion_mnist", "fashion_mnist", 28, 1, 10, (0.2860,), (0.3530,), "none",
                    "train", "test", 5),
        DatasetSpec("cifar10_jpeg", "cifar10_jpeg", 32, 3, 10, _CIFAR10_MEAN, _CIFAR10_STD, "cifar",
                    "train", "test", 5, local=True),
        DatasetSpec("fashion_mnist_idx", "fashion_mnist_idx", 28, 1, 10, (0.2860,), (0.3530,),
                    "none", "train", "test", 5, local=True),
        DatasetSpec("fortunes_chars", "fortunes_chars", 0, 0, 256, (), (), "none", "train", "validation", 0,
                    local=True, task="language_model", context=FORTUNES_CONTEXT),
    )
}


def names() -> tuple[str, ...]:
    """All dataset names the pipelines accept."""
    return tuple(_SPECS)


def get(name: str) -> DatasetSpec:
    """The spec of dataset `name`."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; pick one of {', '.join(_SPECS)}"
        ) from None
