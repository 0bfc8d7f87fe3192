"""The paper's three data settings as index selections (pure numpy, seeded, no global state).

- "plain" (inference-only): every example of the split, labels unchanged.
- "adaptation": the classes are split by a seeded permutation into a source part (the first
  `source_classes` of the permutation: 5 of 10 for CIFAR-10, 90 of 100 for CIFAR-100) and a target
  part (the rest). Only examples of the part's classes are kept, in train and eval splits alike,
  and labels are renumbered 0..n-1 in permutation order, so the target part trains a fresh
  classifier with n outputs.
- "finetune": the training examples are split by a seeded permutation into two halves (25,000 /
  25,000 for CIFAR-10); "source" is the first half, "target" the second. Eval splits are kept whole.

The same `split_seed` always gives the same parts, whatever the shuffle seed of the pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SETTINGS = ("plain", "adaptation", "finetune")
PARTS = ("source", "target")
_CLASS_SPLIT_STREAM = 1  # keeps the class permutation apart from the example permutation
_EXAMPLE_SPLIT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which examples of a split to use, and the label each one gets.

    indices: (n,) positions in the split, ascending. label_map: (num_classes,) int32, the new label
    of each original class (-1: not in this selection). classes: original class ids in new-label
    order (`label_map[classes[k]] == k`).
    """

    indices: np.ndarray
    label_map: np.ndarray
    classes: np.ndarray

    @property
    def num_classes(self) -> int:
        """Number of classes a classifier for this selection needs."""
        return len(self.classes)


def class_split(num_classes: int, source_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source classes, target classes): a seeded permutation of range(num_classes), cut in two."""
    if not 0 < source_classes < num_classes:
        raise ValueError(
            f"source_classes={source_classes} must be between 1 and {num_classes - 1} so that both "
            f"parts of the {num_classes} classes are non-empty"
        )
    order = np.random.default_rng((seed, _CLASS_SPLIT_STREAM)).permutation(num_classes)
    return order[:source_classes], order[source_classes:]


def example_split(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(first half, second half) of range(num_examples) by a seeded permutation, each ascending."""
    if num_examples < 2:
        raise ValueError(f"cannot split {num_examples} example(s) into two non-empty halves")
    order = np.random.default_rng((seed, _EXAMPLE_SPLIT_STREAM)).permutation(num_examples)
    half = num_examples // 2
    return np.sort(order[:half]), np.sort(order[half:])


def check(setting: str, part: str) -> None:
    """Raises ValueError unless `setting` and `part` are known."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; pick one of {', '.join(SETTINGS)}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; pick one of {', '.join(PARTS)}")


def select(
    num_examples: int,
    *,
    num_classes: int,
    setting: str = "plain",
    part: str = "source",
    seed: int = 0,
    source_classes: int | None = None,
    is_train_split: bool = True,
    labels: np.ndarray | None = None,
) -> Selection:
    """The examples of `setting`/`part` among a split of `num_examples` examples.

    `labels` (the split's (num_examples,) labels) is needed by the adaptation setting only.
    """
    check(setting, part)
    identity = np.arange(num_classes, dtype=np.int32)
    if setting == "plain" or (setting == "finetune" and not is_train_split):
        return Selection(np.arange(num_examples), identity, identity)
    if setting == "finetune":
        return Selection(example_split(num_examples, seed)[PARTS.index(part)], identity, identity)
    if labels is None or len(labels) != num_examples:
        raise ValueError(f"the adaptation setting needs the labels of all {num_examples} examples")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range over {labels.min()}..{labels.max()} but the dataset has {num_classes} "
            "classes; the prepared data do not match the dataset spec, re-prepare it"
        )
    source, target = class_split(
        num_classes, num_classes // 2 if source_classes is None else source_classes, seed
    )
    classes = source if part == "source" else target
    label_map = np.full(num_classes, -1, dtype=np.int32)
    label_map[classes] = np.arange(len(classes), dtype=np.int32)
    return Selection(np.flatnonzero(label_map[labels] >= 0), label_map, classes)
