"""The authors' per-layer structural-pruning fractions as SD rules.

The reference (VITA-Group/SmartDeal) reads one number per line from a `*-structure-percentage*.txt`
file and gives line i to the i-th weight of rank >= 2 of its PyTorch network, in module registration
order: every convolution (depthwise ones included) and the linear layer, which takes a line but is
never pruned (`smart_state_dict` in SmartDeal-Training/se/alg_structural.py). Copies of their files
live in experiments/configs/structure/.

`structure_rules(path, layers, model=...)` maps those lines onto sd_jax layer names and returns
`[(f"^{layer}$", {"prune_criterion": "population", "prune_fraction": f}), ...]`, one rule per line,
for `SDRules` or `config.sd.rules`. `layers` are the model's conv and dense layers in build order
(`sd_jax.models.registry.layer_names(model)`); `reference_order` puts them in the authors' order. The
zoo builds a block's shortcut conv before its main path, while PyTorch registers `shortcut` after
the main path's convs (kuangliu's BasicBlock, Bottleneck and MobileNetV2 Block, which the authors'
models are), so each block's `shortcut_conv` moves behind the block's other layers:

    sd_jax build order   stage2_block0/shortcut_conv, stage2_block0/conv1, stage2_block0/conv2
    the authors' order   stage2_block0/conv1, stage2_block0/conv2, stage2_block0/shortcut_conv

ResNet-18 (CIFAR stem) then lines up with the 21 lines of the ResNet-18 files, and MobileNetV2
with `smartdeal_reference=True` (the authors' block: an expand conv at expansion 1 and conv
shortcuts) with the 58 lines of the MobileNetV2 files. A file whose count of lines differs from the
model's count of layers raises ValueError naming the file, the model and both counts.

The rules decide only structural pruning: the first rule that matches a layer wins, so put rules
that must also reach these layers (e.g. `("^head/dense$", {"skip": True})`) before them.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from sd_jax.core.decompose import PRUNE_CRITERIA, DecomposeOptions

Rule = tuple[str, dict[str, Any]]

SHORTCUT = "shortcut_conv"


def read_fractions(path: str | os.PathLike) -> list[float]:
    """The numbers of a structure file, one per line; blank lines and '#' comments are skipped.

    Raises ValueError naming the file and line for a line that holds no number, several numbers or
    something that is not a finite number, and for a file without numbers.
    """
    try:
        with open(path) as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text: the file is damaged"
        raise ValueError(f"structure file {os.fspath(path)!r} cannot be read ({reason}); "
                         "pass one of experiments/configs/structure/*.txt") from None
    values = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 1:
            raise ValueError(f"structure file {os.fspath(path)!r}, line {number}: {len(fields)} numbers "
                             f"({line.strip()!r}); a structure file holds one fraction per line")
        try:
            value = float(fields[0])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"structure file {os.fspath(path)!r}, line {number}: {fields[0]!r} is not a "
                             "finite number")
        values.append(value)
    if not values:
        raise ValueError(f"structure file {os.fspath(path)!r} holds no numbers")
    return values


def _block(layer: str) -> str:
    return layer.rsplit("/", 1)[0] if "/" in layer else layer


def reference_order(layers: Sequence[str]) -> list[str]:
    """Zoo layer names (build order) in the authors' module order: in each run of layers that share
    a block prefix (`stage2_block0/`), the `shortcut_conv` goes last."""
    ordered: list[str] = []
    start = 0
    while start < len(layers):
        end = start + 1
        while end < len(layers) and _block(layers[end]) == _block(layers[start]):
            end += 1
        run = list(layers[start:end])
        ordered += [name for name in run if not name.endswith(SHORTCUT)] + [
            name for name in run if name.endswith(SHORTCUT)]
        start = end
    return ordered


def structure_rules(
    path: str | os.PathLike, layers: Sequence[str], *, model: str, criterion: str = "population",
) -> list[Rule]:
    """One rule per line of the structure file at `path`, for the layers of `model` in the authors' order.

    layers: the model's conv and dense layers in build order (`registry.layer_names(model)`); model:
    its name, for errors. criterion: the authors' `prune_type` the numbers are for ('population'
    in both of their scripts: the number is `prune_fraction`; 'value' and 'energy': it is
    `prune_threshold`; 'sd_jax': sd_jax's own rule with the number as `prune_fraction`).
    """
    if criterion not in PRUNE_CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {PRUNE_CRITERIA}")
    values = read_fractions(path)
    layers = list(layers)
    if len(values) != len(layers):
        hint = (" (the authors' MobileNetV2 block is sd_jax's mobilenet_v2 with smartdeal_reference=True)"
                if "mobilenet" in model else "")
        raise ValueError(
            f"structure file {os.fspath(path)!r} has {len(values)} lines, but model {model!r} has {len(layers)} "
            f"conv and dense layers; the file needs one line per conv and linear layer of the authors' network, "
            f"in their module order: pass the file made for this model{hint}")
    key = "prune_fraction" if criterion in ("sd_jax", "population") else "prune_threshold"
    rules = []
    for number, (layer, value) in enumerate(zip(reference_order(layers), values), start=1):
        options = {"prune_criterion": criterion, key: value}
        where = f"structure file {os.fspath(path)!r}, line {number} (layer {layer!r})"
        DecomposeOptions.from_kwargs(where, **options)
        rules.append((f"^{re.escape(layer)}$", options))
    return rules
