"""The paper's three data settings as index selections (pure numpy, seeded, no global state).

- "plain" (inference-only): every example of the split, labels unchanged.
- "adaptation": the classes are split by a seeded permutation into a source part (the first
  `source_classes` of the permutation: 5 of 10 for CIFAR-10, 90 of 100 for CIFAR-100) and a target
  part (the rest). Only examples of the part's classes are kept, in train and eval splits alike.
- "finetune": the training examples are split by a seeded permutation into two halves (25,000 /
  25,000 for CIFAR-10); "source" is the first half, "target" the second. Eval splits are kept whole.

Two split rules (`split_rule`) say how the permutations are drawn and what adaptation does to labels:

- "sd_jax": permutations from `np.random.default_rng((split_seed, stream))`, one stream for classes
  and one for examples; adaptation renumbers labels 0..n-1 in permutation order, so the target part
  trains a fresh classifier with n outputs.
- "reference": the authors' (VITA-Group/SmartDeal, SmartDeal-Training/main.py and main_c100.py):
  `np.random.seed(split_seed); np.random.permutation(n)`, drawn here from
  `np.random.RandomState(split_seed)` (the same stream, no global state). CIFAR-10 with seed 0:
  classes [2, 8, 4, 9, 1] / [6, 7, 3, 0, 5]. Adaptation keeps the original labels and a classifier
  over all the dataset's classes (10 or 100 outputs).

The same `split_seed` always gives the same parts, whatever the shuffle seed of the pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SETTINGS = ("plain", "adaptation", "finetune")
PARTS = ("source", "target")
SPLIT_RULES = ("sd_jax", "reference")
_CLASS_SPLIT_STREAM = 1  # keeps the class permutation apart from the example permutation (sd_jax rule)
_EXAMPLE_SPLIT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which examples of a split to use, and the label each one gets.

    indices: (n,) positions in the split, ascending. label_map: (dataset classes,) int32, the label
    each original class gets (-1: not in this selection). classes: the original class ids kept, in
    split order (sd_jax rule: `label_map[classes[k]] == k`; reference rule: labels are kept,
    `label_map[c] == c`). num_classes: outputs a classifier for this selection needs.
    """

    indices: np.ndarray
    label_map: np.ndarray
    classes: np.ndarray
    num_classes: int


def _permutation(n: int, seed: int, split_rule: str, stream: int) -> np.ndarray:
    """A seeded permutation of range(n) by `split_rule` (see the module docstring)."""
    if split_rule == "reference":
        return np.random.RandomState(seed).permutation(n)  # = np.random.seed(seed); np.random.permutation(n)
    return np.random.default_rng((seed, stream)).permutation(n)


def class_split(
    num_classes: int, source_classes: int, seed: int, split_rule: str = "sd_jax"
) -> tuple[np.ndarray, np.ndarray]:
    """(source classes, target classes): a seeded permutation of range(num_classes), cut in two."""
    check_split_rule(split_rule)
    if not 0 < source_classes < num_classes:
        raise ValueError(
            f"source_classes={source_classes} must be between 1 and {num_classes - 1} so that both "
            f"parts of the {num_classes} classes are non-empty"
        )
    order = _permutation(num_classes, seed, split_rule, _CLASS_SPLIT_STREAM)
    return order[:source_classes], order[source_classes:]


def example_split(num_examples: int, seed: int, split_rule: str = "sd_jax") -> tuple[np.ndarray, np.ndarray]:
    """(first half, second half) of range(num_examples) by a seeded permutation, each ascending."""
    check_split_rule(split_rule)
    if num_examples < 2:
        raise ValueError(f"cannot split {num_examples} example(s) into two non-empty halves")
    order = _permutation(num_examples, seed, split_rule, _EXAMPLE_SPLIT_STREAM)
    half = num_examples // 2
    return np.sort(order[:half]), np.sort(order[half:])


def check_split_rule(split_rule: str) -> None:
    """Raises ValueError unless `split_rule` is known."""
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {split_rule!r}; pick one of {', '.join(SPLIT_RULES)}")


def check(setting: str, part: str, split_rule: str = "sd_jax") -> None:
    """Raises ValueError unless `setting`, `part` and `split_rule` are known."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; pick one of {', '.join(SETTINGS)}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; pick one of {', '.join(PARTS)}")
    check_split_rule(split_rule)


def num_outputs(num_classes: int, *, setting: str = "plain", part: str = "source", source_classes: int | None = None,
                split_rule: str = "sd_jax") -> int:
    """Outputs of the classifier for `setting`/`part`: every class, except an adaptation part under the
    "sd_jax" rule, whose labels are renumbered 0..n-1 over its own classes (the source half holds
    `source_classes`, default half of them)."""
    check(setting, part, split_rule)
    if setting != "adaptation" or split_rule == "reference":
        return num_classes
    source = num_classes // 2 if source_classes is None else source_classes
    return source if part == "source" else num_classes - source


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
    split_rule: str = "sd_jax",
) -> Selection:
    """The examples of `setting`/`part` among a split of `num_examples` examples.

    `labels` (the split's (num_examples,) labels) is needed by the adaptation setting only.
    """
    check(setting, part, split_rule)
    identity = np.arange(num_classes, dtype=np.int32)
    if setting == "plain" or (setting == "finetune" and not is_train_split):
        return Selection(np.arange(num_examples), identity, identity, num_classes)
    if setting == "finetune":
        halves = example_split(num_examples, seed, split_rule)
        return Selection(halves[PARTS.index(part)], identity, identity, num_classes)
    if labels is None or len(labels) != num_examples:
        raise ValueError(f"the adaptation setting needs the labels of all {num_examples} examples")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range over {labels.min()}..{labels.max()} but the dataset has {num_classes} "
            "classes; the prepared data do not match the dataset spec, re-prepare it"
        )
    source, target = class_split(
        num_classes, num_classes // 2 if source_classes is None else source_classes, seed, split_rule
    )
    classes = source if part == "source" else target
    label_map = np.full(num_classes, -1, dtype=np.int32)
    if split_rule == "reference":  # original labels, a classifier over every class
        label_map[classes] = classes
        outputs = num_classes
    else:
        label_map[classes] = np.arange(len(classes), dtype=np.int32)
        outputs = len(classes)
    return Selection(np.flatnonzero(label_map[labels] >= 0), label_map, classes, outputs)
