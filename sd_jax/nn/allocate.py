"""Per-layer SD settings for a storage target (`sd.target_compression`, `sd.target_bytes`).

`allocate(params, rules, target)` measures, for every kernel the rules select, a grid of candidate
settings (`THRESHOLDS` in units of the layer's RMS, `threshold_scale='layer'`, times
`PRUNE_FRACTIONS` of structural pruning) and picks one per layer by the budgeted allocation of
`sd_jax.core.allocation`: least summed distortion (squared relative reconstruction error times the
layer's sensitivity, 1 unless given) within the storage budget the target sets.

Speed: all candidates of all layers go to one `decompose_many` call (a few compilations). Layers with
more than `SAMPLE_WEIGHTS` weights are measured on evenly spaced output channels (blocks never span
output channels, so the sample's blocks are the layer's own) and their bits scaled up.

The result is rules: one `(^layer$, {threshold, threshold_scale, prune_fraction, ...})` per layer,
placed before the config's own rules (whose options for that layer it carries), so
`Allocation.sd_rules(rules)` decomposes the network as chosen, and `write`/`read_rules` store them as
JSON beside a run for reuse (`config.sd.rules = allocate.read_rules(path)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sd_jax import io as sd_io
from sd_jax.core import allocation
from sd_jax.core.allocation import Target
from sd_jax.core.decompose import DecomposeOptions, LossyDecompositionWarning, TensorJob, decompose_many, threshold_unit
from sd_jax.core.network import path_name
from sd_jax.nn.rules import Rule, SDRules

# Candidate thresholds in units of the layer's RMS: 2^-4 .. 2^2 in half octaves.
THRESHOLDS = tuple(2.0 ** (e / 2) for e in range(-8, 5))
PRUNE_FRACTIONS = (0.0, 0.5)
SAMPLE_WEIGHTS = 16384
REFINE_STEPS = 6
ALLOCATION_FILE = "sd_allocation.json"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The setting chosen for one layer and what it was measured to give."""

    layer: str
    threshold: float  # in units of the layer's RMS
    prune_fraction: float
    estimated_bits: float
    rel_error: float


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The chosen per-layer settings as rules, and the storage they were estimated to reach."""

    target: Target
    rules: tuple[Rule, ...]
    layers: tuple[LayerChoice, ...]
    estimated_compression: float
    reachable: tuple[float, float]  # (least, most) compression of the candidate grid

    def sd_rules(self, base: SDRules) -> SDRules:
        """`base` with the allocation's rules placed first."""
        return SDRules([*self.rules, *base.rules], max_kernel_size=base.max_kernel_size, **base.defaults)

    def to_json(self) -> str:
        """The allocation as JSON: `rules` (the rules format of `sd.rules`), per-layer figures, the target."""
        return json.dumps(dict(
            target=dataclasses.asdict(self.target), rules=[list(rule) for rule in self.rules],
            layers=[dataclasses.asdict(choice) for choice in self.layers],
            estimated_compression=self.estimated_compression, reachable_compression=list(self.reachable),
        ), indent=1)

    def write(self, path: str) -> None:
        """Write `to_json` to `path`."""
        sd_io.as_path(path).write_text(self.to_json())


def read_rules(path: str) -> list[Rule]:
    """The rules of an allocation file (`Allocation.write`), for `config.sd.rules`."""
    try:
        data = json.loads(sd_io.as_path(path).read_text())
        return [(pattern, dict(options)) for pattern, options in data["rules"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an allocation file with a 'rules' list ({error}); pass a file that "
                         f"--mode=decompose wrote as {ALLOCATION_FILE}") from None


def _sample(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """(evenly spaced output channels of `weight` holding about SAMPLE_WEIGHTS weights, layer size / sample size).

    The sample is rescaled by a power of two so that its layer unit (`threshold_unit`) is the whole
    layer's: its decomposition is then the layer's own on those channels."""
    outputs = weight.shape[-1]
    keep = min(outputs, max(1, math.ceil(SAMPLE_WEIGHTS * outputs / weight.size)))
    sample = weight[..., np.linspace(0, outputs - 1, keep).round().astype(int)]
    layer = DecomposeOptions(threshold_scale="layer")
    unit, sample_unit = threshold_unit(weight, layer), threshold_unit(sample, layer)
    return sample * np.float32(unit / sample_unit if sample_unit else 1.0), outputs / keep


def _first_rule(rules: SDRules, layer: str) -> dict[str, Any]:
    return next((dict(options) for pattern, options in rules.rules if re.search(pattern, layer)), {})


def _measure(job: TensorJob, scale: float) -> tuple[float, float]:
    """(estimated bits of the whole layer, relative error) of one sampled job."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyDecompositionWarning)
        found = decompose_many([job])[0].report
    return found.storage_bits * scale, found.rel_error


def _spend(job: TensorJob, scale: float, grid: list[tuple[float, float]], costs: list[float], errors: list[float],
           j: int, spare: float) -> tuple[float, float, float]:
    """(threshold, bits, relative error) of the layer of `job` with its threshold lowered from candidate j
    toward the next costlier threshold of the same pruning fraction, spending nearest `spare` more bits:
    geometric bisection of the threshold, `REFINE_STEPS` measurements."""
    threshold, fraction = grid[j]
    lower = [i for i, (t, p) in enumerate(grid) if p == fraction and t < threshold]
    best = (threshold, costs[j], errors[j])
    if not lower or spare <= 0:
        return best
    costlier = max(lower, key=lambda i: grid[i][0])
    high, low = threshold, grid[costlier][0]
    for _ in range(REFINE_STEPS):
        middle = math.sqrt(high * low)
        bits, error = _measure(dataclasses.replace(job, options=dataclasses.replace(job.options, threshold=middle)),
                               scale)
        if bits - costs[j] <= spare:
            best, high = (middle, bits, error), middle
        else:
            low = middle
    # Bits jump where a threshold adds an exponent (one more bit per non-zero): the costlier grid point
    # may then be nearer the budget than anything below it.
    if costs[costlier] - costs[j] - spare < spare - (best[1] - costs[j]):
        return grid[costlier][0], costs[costlier], errors[costlier]
    return best


def allocate(params: Any, rules: SDRules, target: Target, sensitivity: Mapping[str, float] | None = None, *,
             thresholds: tuple[float, ...] = THRESHOLDS,
             prune_fractions: tuple[float, ...] = PRUNE_FRACTIONS) -> Allocation:
    """Choose each selected layer's threshold and pruning fraction so the network meets `target`.

    `params`: the dense parameter tree; `rules`: which layers become SD and their other options;
    `sensitivity`: optional {layer: weight of its distortion} (e.g. from a calibration batch), 1 for
    unnamed layers; `thresholds` (layer RMS units) and `prune_fractions`: the candidate grid. The
    discrete choice lands below the budget by at most one grid step; the largest layer's threshold is
    then bisected between its grid neighbours to spend the rest. Raises ValueError naming the
    reachable compression range when the target is out of it.
    """
    plan = rules.planner()
    layers, jobs, scales, dense_params = [], [], [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        chosen = plan(name, tuple(np.shape(leaf))) if name.endswith("/kernel") else None
        if chosen is None:
            dense_params += int(np.size(leaf))
            continue
        kind, options = chosen
        sample, scale = _sample(np.asarray(leaf, np.float32))
        by_fraction = options.prune_criterion in ("sd_jax", "population")
        grid = [(t, p) for p in (prune_fractions if by_fraction else (options.prune_fraction,)) for t in thresholds]
        layers.append((name.rpartition("/")[0], np.size(leaf), grid))
        scales.append(scale)
        jobs += [TensorJob(name, sample, kind, dataclasses.replace(options, threshold=t, threshold_scale="layer",
                                                                   prune_fraction=p)) for t, p in grid]
    if not layers:
        raise ValueError("allocate: the rules select no kernel; nothing to allocate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyDecompositionWarning)
        results = iter(decompose_many(jobs))
    costs, distortions, errors = [], [], []
    for (layer, size, grid), scale in zip(layers, scales):
        reports = [next(results).report for _ in grid]
        costs.append([r.storage_bits * scale for r in reports])
        errors.append([r.rel_error for r in reports])
        weight = 1.0 if sensitivity is None else float(sensitivity.get(layer, 1.0))
        distortions.append([weight * r.rel_error ** 2 for r in reports])
    dense_bits = 32.0 * (sum(size for _, size, _ in layers) + dense_params)
    fixed = 32.0 * dense_params
    least = fixed + sum(min(c) for c in costs)
    most = fixed + sum(max(c) for c in costs)
    reachable = (dense_bits / most, dense_bits / least)
    budget = target.budget_bits(dense_bits)
    if not least <= budget <= most * 1.0000001:
        raise ValueError(
            f"{target.describe()} is out of reach: with these rules the network reaches compression "
            f"{reachable[0]:.3g}x to {reachable[1]:.3g}x (storage {least / 8:,.0f} to {most / 8:,.0f} bytes, thresholds "
            f"{min(thresholds):.3g} to {max(thresholds):.3g} layer RMS, prune fractions {prune_fractions}); "
            "pass a target inside that range, or keep more layers dense for a lower one")
    choice = allocation.allocate(costs, distortions, budget - fixed)
    spare = budget - fixed - sum(c[j] for c, j in zip(costs, choice))
    largest = max(range(len(layers)), key=lambda index: costs[index][choice[index]])
    chosen_layers, chosen_rules, total = [], [], fixed
    for index, ((layer, _, grid), c, e, j) in enumerate(zip(layers, costs, errors, choice)):
        threshold, bits, error = grid[j][0], c[j], e[j]
        if index == largest:
            first = sum(len(grid) for _, _, grid in layers[:index])
            threshold, bits, error = _spend(jobs[first + j], scales[index], grid, c, e, j, spare)
        fraction = grid[j][1]
        total += bits
        chosen_layers.append(LayerChoice(layer, threshold, fraction, bits, error))
        options = {**_first_rule(rules, layer), "threshold": threshold, "threshold_scale": "layer",
                   "prune_fraction": fraction}
        chosen_rules.append((f"^{re.escape(layer)}$", options))
    return Allocation(target, tuple(chosen_rules), tuple(chosen_layers), dense_bits / total, reachable)


def targeted_rules(config: Any, params: Any) -> tuple[SDRules, Allocation | None]:
    """The rules of `config`'s `sd` section, with the per-layer allocation for its storage target (if one
    is set) placed first; the allocation too, for writing beside the run."""
    rules = SDRules.from_config(config)
    target = SDRules.target_of(config)
    if target is None:
        return rules, None
    found = allocate(params, rules, target)
    return found.sd_rules(rules), found


def allocation_path(output: str) -> str:
    """Where the allocation of a decomposition written to `output` goes: `<output>.sd_allocation.json`."""
    return f"{str(output).rstrip('/')}.{ALLOCATION_FILE}"
