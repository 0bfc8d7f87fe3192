"""Per-layer SD settings for a target: a storage (`sd.target_compression`, `sd.target_bytes`) or an
inference energy (`sd.target_energy_ratio`, priced by `sd_jax.cost.pricing`).

`allocate(params, rules, target)` measures, for every kernel the rules select, a grid of candidate
settings (`THRESHOLDS` in units of the layer's RMS, `threshold_scale='layer'`, times
`PRUNE_FRACTIONS` of structural pruning) and picks one per layer by the budgeted allocation of
`sd_jax.core.allocation`: least summed distortion (squared relative reconstruction error times the
layer's sensitivity, 1 unless given) within the budget the target sets; a candidate's cost is its
layer's storage bits (`StoragePricing`) or inference energy (a `Pricing` from `sd_jax.cost`).

Speed: all candidates of all layers go to one `decompose_many` call (a few compilations). Layers with
more than `SAMPLE_WEIGHTS` weights are measured on evenly spaced output channels (blocks never span
output channels, so the sample's blocks are the layer's own) and their counts scaled up. A sample can
miss an exponent the whole layer holds (a bit more per non-zero: VGG-16's 3×3 512-channel layers cost
20 % more than four sampled channels say), so the chosen candidates of sampled layers are then
measured in full, all in one call, and the choice repeated with those figures (every other candidate
of a measured layer corrected by the same factor) until the chosen candidates left unmeasured cost at
most `SAMPLED_SHARE` of the budget (`FULL_ROUNDS` at most); the final bisection measures in full too.
Every call pads its buckets to the same sizes (`compiled_sizes`), so each bucket compiles once.

`uniform(params, rules, target)` (`sd.target_method=uniform`) chooses nothing per layer: it bisects one
factor on every layer's configured threshold until the network meets the target, the hand-set uniform
threshold found for the budget. At equal compression it has kept more accuracy than the per-layer
choice on ResNet-20 (docs/compression_targets.md).

Either result is rules: one `(^layer$, {threshold, threshold_scale, prune_fraction, ...})` per layer,
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from sd_jax import io as sd_io
from sd_jax.core import allocation, blocking
from sd_jax.core.allocation import Target
from sd_jax.core.decompose import (Decomposition, DecomposeOptions, LossyDecompositionWarning, TensorJob,
                                   compiled_sizes, decompose_many, threshold_unit)
from sd_jax.core.network import path_name
from sd_jax.core.report import TensorReport
from sd_jax.nn.rules import Rule, SDRules

# Candidate thresholds in units of the layer's RMS: 2^-4 .. 2^2 in half octaves.
THRESHOLDS = tuple(2.0 ** (e / 2) for e in range(-8, 5))
MIDDLE_THRESHOLD = 0.5  # where `calibrated_sensitivity` measures each layer
PRUNE_FRACTIONS = (0.0, 0.5)
SAMPLE_WEIGHTS = 16384
REFINE_STEPS = 4
# Rounds of choosing and measuring the chosen candidates of sampled layers in full, until those not
# measured in full cost at most SAMPLED_SHARE of the budget (their corrected estimates are off by a few
# per cent at most, so the total by a fraction of that).
FULL_ROUNDS = 8
SAMPLED_SHARE = 0.05
# `uniform`: the range of the one factor on the configured thresholds, how close its geometric bisection on
# the samples narrows it (12 halvings of 2^16), and the whole-network decompositions that correct them.
FACTORS = (2.0**-8, 2.0**8)
FACTOR_RESOLUTION = 2.0 ** (16 / 2**12)
FULL_STEPS = 4
UNIFORM_TOLERANCE = 0.005
ALLOCATION_FILE = "sd_allocation.json"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The setting chosen for one layer and what it was measured to give."""

    layer: str
    threshold: float  # in units of `threshold_scale`
    prune_fraction: float
    estimated_cost: float  # storage bits, or inference energy for an energy target
    rel_error: float
    threshold_scale: str = "layer"


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The chosen per-layer settings as rules, and what they were estimated to reach: a compression, or
    for an energy target an inference energy ratio."""

    target: Target
    rules: tuple[Rule, ...]
    layers: tuple[LayerChoice, ...]
    estimated: float
    reachable: tuple[float, float]  # (least, most) compression or energy ratio of the candidate grid

    def sd_rules(self, base: SDRules) -> SDRules:
        """`base` with the allocation's rules placed first."""
        return placed_first(self.rules, base)

    def to_json(self) -> str:
        """The allocation as JSON: `rules` (the rules format of `sd.rules`), per-layer figures, the target."""
        return json.dumps(dict(
            target=dataclasses.asdict(self.target), rules=[list(rule) for rule in self.rules],
            layers=[dataclasses.asdict(choice) for choice in self.layers],
            estimated=self.estimated, reachable=list(self.reachable),
        ), indent=1)

    def write(self, path: str) -> None:
        """Write `to_json` to `path`."""
        sd_io.as_path(path).write_text(self.to_json())


def placed_first(rules: Sequence[Rule], base: SDRules) -> SDRules:
    """`base` with `rules` (an allocation's) placed before its own, so they decide the layers they name."""
    return SDRules([*rules, *base.rules], max_kernel_size=base.max_kernel_size, **base.defaults)


def _read(path: str, key: str) -> Any:
    try:
        return json.loads(sd_io.as_path(path).read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an allocation file with a {key!r} entry ({error}); pass a file that "
                         f"--mode=decompose wrote as {ALLOCATION_FILE}") from None


def read_rules(path: str) -> list[Rule]:
    """The rules of an allocation file (`Allocation.write`), for `config.sd.rules`."""
    rules = _read(path, "rules")
    try:
        return [(pattern, dict(options)) for pattern, options in rules]
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: its 'rules' are not [pattern, options] pairs ({error}); pass a file that "
                         f"--mode=decompose wrote as {ALLOCATION_FILE}") from None


def read_target(path: str) -> Target:
    """The target an allocation file (`Allocation.write`) was chosen for."""
    try:
        return Target(**_read(path, "target"))
    except TypeError as error:
        raise ValueError(f"{path}: its 'target' is not a target ({error}); pass a file that --mode=decompose "
                         f"wrote as {ALLOCATION_FILE}") from None


@dataclasses.dataclass(frozen=True)
class CandidateStats:
    """What one candidate setting makes of a whole layer: the counts `sd_jax.cost` prices (estimated from
    a sample of output channels for large layers, so `nonzeros` and `storage_bits` may be fractional)."""

    nonzeros: float
    distinct_exponents: int
    coeff_entries: int
    basis_entries: int
    k: int
    storage_bits: float


class Pricing(Protocol):
    """What a target counts: storage bits (`StoragePricing`) or inference energy (`sd_jax.cost.pricing`)."""

    def dense_total(self, sizes: Mapping[str, int], dense_params: int) -> float:
        """The dense network's total: `sizes` are the weights of each allocated layer's kernel,
        `dense_params` the other parameters."""

    def fixed(self, sizes: Mapping[str, int], dense_params: int) -> float:
        """The part of the SD network's total that no candidate changes."""

    def costs(self, layer: str, candidates: Sequence[CandidateStats]) -> np.ndarray:
        """The cost of each candidate of `layer`."""


class StoragePricing:
    """Storage in bits, as the decompose report counts it: SD tensors, other parameters at 32 bits."""

    def dense_total(self, sizes: Mapping[str, int], dense_params: int) -> float:
        return 32.0 * (sum(sizes.values()) + dense_params)

    def fixed(self, sizes: Mapping[str, int], dense_params: int) -> float:
        return 32.0 * dense_params

    def costs(self, layer: str, candidates: Sequence[CandidateStats]) -> np.ndarray:
        return np.array([candidate.storage_bits for candidate in candidates], np.float64)


def _pricing(target: Target, pricing: Pricing | None) -> Pricing:
    """`pricing`, storage bits when None; an energy target without one is refused."""
    if target.counts_energy and pricing is None:
        raise ValueError(f"{target.describe()} needs the model's layers to price energy; pass "
                         "pricing=sd_jax.cost.pricing.energy_pricing(...) (the commands do)")
    return pricing or StoragePricing()


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


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One allocated layer: its name, full kernel, sample, scale (layer / sample outputs) and candidate grid."""

    name: str
    kernel: np.ndarray
    sample: np.ndarray
    scale: float
    kind: str
    options: DecomposeOptions
    grid: tuple[tuple[float, float], ...]  # (threshold in layer RMS, prune fraction)

    def job(self, threshold: float, fraction: float, *, full: bool = False) -> TensorJob:
        options = dataclasses.replace(self.options, threshold=threshold, threshold_scale="layer",
                                      prune_fraction=fraction)
        return TensorJob(self.name, self.kernel if full else self.sample, self.kind, options)

    def stats(self, found: TensorReport, *, full: bool = False) -> CandidateStats:
        """The whole layer's counts from the report of its sample (or, `full`, of the layer itself)."""
        spec = blocking.block_spec(self.kernel.shape, self.kind, group_size=self.options.group_size,
                                   row_length=self.options.row_length, max_rows=self.options.max_rows)
        scale = 1.0 if full else self.scale
        return CandidateStats(found.nonzeros * scale, found.distinct_exponents, spec.num_blocks * spec.rows * spec.k,
                              spec.num_blocks * spec.k * spec.k, spec.k, found.storage_bits * scale)


def _decompose(jobs: list[TensorJob], sizes: Mapping[tuple, tuple[int, int]] | None = None) -> list[Decomposition]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyDecompositionWarning)
        return decompose_many(jobs, min_sizes=sizes)


def _padded(*calls: list[TensorJob]) -> dict[tuple, tuple[int, int]]:
    """Bucket sizes that fit each of `calls` (lists of jobs), so one compiled program per bucket serves them
    all (compiling costs more than running the padding)."""
    padded: dict[tuple, tuple[int, int]] = {}
    for jobs in calls:
        for key, sizes in compiled_sizes(jobs).items():
            padded[key] = tuple(max(pair) for pair in zip(padded.get(key, (0, 0)), sizes))
    return padded


def _spend(layer: _Layer, pricing: Pricing, costs: np.ndarray, errors: list[float], j: int, spare: float,
           sizes: Mapping[tuple, tuple[int, int]]) -> tuple[float, float, float]:
    """(threshold, cost, relative error) of `layer` with its threshold lowered from candidate j (measured
    in full) toward the next costlier threshold of the same pruning fraction, spending nearest `spare`
    more: geometric bisection of the threshold, `REFINE_STEPS` measurements of the whole layer."""
    threshold, fraction = layer.grid[j]
    lower = [i for i, (t, p) in enumerate(layer.grid) if p == fraction and t < threshold]
    best = (threshold, costs[j], errors[j])
    if not lower or spare <= 0:
        return best

    def measured(threshold: float) -> tuple[float, float, float]:
        found = _decompose([layer.job(threshold, fraction, full=True)], sizes)[0].report
        return threshold, float(pricing.costs(layer.name, [layer.stats(found, full=True)])[0]), found.rel_error

    high, low = threshold, max(layer.grid[i][0] for i in lower)
    above = None  # the measurement at `low`, once the bisection has made one
    for _ in range(REFINE_STEPS):
        middle = measured(math.sqrt(high * low))
        if middle[1] - costs[j] <= spare:
            best, high = middle, middle[0]
        else:
            above, low = middle, middle[0]
    # Bits jump where a threshold adds an exponent (one more bit per non-zero): the nearest threshold
    # measured above the budget (the costlier grid point if none was) may be nearer it than anything below.
    costlier = above or measured(low)
    return costlier if costlier[1] - costs[j] - spare < spare - (best[1] - costs[j]) else best


def _layers(params: Any, rules: SDRules, thresholds: tuple[float, ...], prune_fractions: tuple[float, ...]
            ) -> tuple[list[_Layer], int]:
    """(the kernels `rules` select, with their candidate grids; the number of other parameters)."""
    plan = rules.planner()
    layers, dense_params = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        chosen = plan(name, tuple(np.shape(leaf))) if name.endswith("/kernel") else None
        if chosen is None:
            dense_params += int(np.size(leaf))
            continue
        kind, options = chosen
        kernel = np.asarray(leaf, np.float32)
        sample, scale = _sample(kernel)
        by_fraction = options.prune_criterion in ("sd_jax", "population")
        grid = tuple((t, p) for p in (prune_fractions if by_fraction else (options.prune_fraction,))
                     for t in thresholds)
        layers.append(_Layer(name.rpartition("/")[0], kernel, sample, scale, kind, options, grid))
    if not layers:
        raise ValueError("allocate: the rules select no kernel; nothing to allocate")
    return layers, dense_params


def _reach(target: Target, dense_total: float, least: float, most: float) -> tuple[float, float]:
    """The (least, most) of the target's measure the candidate grid reaches: compression or energy ratio."""
    if target.counts_energy:
        return least / dense_total, most / dense_total
    return dense_total / most, dense_total / least


def _out_of_range(target: Target, reachable: tuple[float, float], least: float, most: float, settings: str
                  ) -> ValueError:
    if target.counts_energy:
        reached = f"inference energy ratio {reachable[0]:.3g} to {reachable[1]:.3g} of the dense float32 network ("
    else:
        reached = (f"compression {reachable[0]:.3g}x to {reachable[1]:.3g}x (storage {least / 8:,.0f} to "
                   f"{most / 8:,.0f} bytes, ")
    return ValueError(f"{target.describe()} is out of reach: with these rules the network reaches {reached}"
                      f"{settings}); pass a target inside that range, or keep more layers dense for a lower one")


def allocate(params: Any, rules: SDRules, target: Target, sensitivity: Mapping[str, float] | None = None, *,
             pricing: Pricing | None = None, thresholds: tuple[float, ...] = THRESHOLDS,
             prune_fractions: tuple[float, ...] = PRUNE_FRACTIONS) -> Allocation:
    """Choose each selected layer's threshold and pruning fraction so the network meets `target`.

    `params`: the dense parameter tree; `rules`: which layers become SD and their other options;
    `sensitivity`: optional {layer: weight of its distortion} (e.g. from a calibration batch), 1 for
    unnamed layers; `pricing`: what a candidate costs, storage bits unless given (an energy target needs
    `sd_jax.cost.pricing.energy_pricing`); `thresholds` (layer RMS units) and `prune_fractions`: the
    candidate grid. The discrete choice lands below the budget by at most one grid step; the largest
    layer's threshold is then bisected between its grid neighbours to spend the rest. Sampled layers
    whose chosen candidate a missed exponent would make costlier are measured in full. Raises
    ValueError naming the reachable range when the target is out of it.
    """
    pricing = _pricing(target, pricing)
    layers, dense_params = _layers(params, rules, thresholds, prune_fractions)
    grid_jobs = [layer.job(*candidate) for layer in layers for candidate in layer.grid]
    # Every call pads its buckets to the larger of the grid's and a full round's sizes: one compilation
    # per bucket serves them all (compiling costs more than running the padding).
    padded = _padded([layer.job(*layer.grid[0], full=True) for layer in layers if layer.scale > 1], grid_jobs)
    found = iter(result.report for result in _decompose(grid_jobs, padded))
    reports = [[next(found) for _ in layer.grid] for layer in layers]
    stats = [[layer.stats(r) for r in layer_reports] for layer, layer_reports in zip(layers, reports)]
    costs = [pricing.costs(layer.name, layer_stats) for layer, layer_stats in zip(layers, stats)]
    errors = [[r.rel_error for r in layer_reports] for layer_reports in reports]
    distortions = [[(1.0 if sensitivity is None else float(sensitivity.get(layer.name, 1.0))) * e ** 2 for e in error]
                   for layer, error in zip(layers, errors)]
    sizes = {layer.name: layer.kernel.size for layer in layers}
    dense_total, fixed = pricing.dense_total(sizes, dense_params), pricing.fixed(sizes, dense_params)
    least, most = fixed + sum(min(c) for c in costs), fixed + sum(max(c) for c in costs)
    reachable = _reach(target, dense_total, least, most)
    budget = target.budget(dense_total)
    if not least <= budget <= most * 1.0000001:
        raise _out_of_range(target, reachable, least, most, f"thresholds {min(thresholds):.3g} to "
                            f"{max(thresholds):.3g} layer RMS, prune fractions {prune_fractions}")
    full: set[tuple[int, int]] = set()
    for _ in range(FULL_ROUNDS):
        choice = allocation.allocate(costs, distortions, budget - fixed)
        suspects = [(index, j) for index, j in enumerate(choice) if layers[index].scale > 1 and (index, j) not in full]
        if sum(costs[index][j] for index, j in suspects) <= SAMPLED_SHARE * budget:
            break
        measured = [result.report for result in
                    _decompose([layers[index].job(*layers[index].grid[j], full=True) for index, j in suspects], padded)]
        for (index, j), report_ in zip(suspects, measured):
            full.add((index, j))
            stats[index][j] = layers[index].stats(report_, full=True)
            cost = pricing.costs(layers[index].name, [stats[index][j]])[0]
            # The layer's other sampled estimates are likely off by as much: correct them alike.
            sampled = [i for i in range(len(layers[index].grid)) if (index, i) not in full]
            costs[index][sampled] *= cost / costs[index][j]
            costs[index][j], errors[index][j] = cost, report_.rel_error
    spare = budget - fixed - sum(c[j] for c, j in zip(costs, choice))
    largest = max(range(len(layers)), key=lambda index: costs[index][choice[index]])
    chosen_layers, chosen_rules, total = [], [], fixed
    for index, (layer, c, e, j) in enumerate(zip(layers, costs, errors, choice)):
        threshold, cost, error = layer.grid[j][0], c[j], e[j]
        if index == largest:
            threshold, cost, error = _spend(layer, pricing, c, e, j, spare, padded)
        fraction = layer.grid[j][1]
        total += cost
        chosen_layers.append(LayerChoice(layer.name, threshold, fraction, float(cost), error))
        options = {**_first_rule(rules, layer.name), "threshold": threshold, "threshold_scale": "layer",
                   "prune_fraction": fraction}
        chosen_rules.append((f"^{re.escape(layer.name)}$", options))
    return Allocation(target, tuple(chosen_rules), tuple(chosen_layers), _reach(target, dense_total, total, total)[0],
                      reachable)


def uniform(params: Any, rules: SDRules, target: Target, *, pricing: Pricing | None = None,
            factors: tuple[float, float] = FACTORS) -> Allocation:
    """Meet `target` with one factor on every selected layer's configured threshold (the config's
    `threshold`, or its rule's), its other options as configured: the single hand-set threshold, found for
    the target. On ResNet-20 it kept more accuracy than `allocate`'s per-layer choice at equal
    compression (docs/compression_targets.md).

    The factor is bisected geometrically within `factors` on the layers' samples (as `allocate` samples
    them); the whole network is then decomposed at that factor, and while it lands more than
    `UNIFORM_TOLERANCE` off the budget, the sampled goal is corrected by the ratio found and the factor
    bisected again (`FULL_STEPS` full decompositions at most; the one nearest the budget wins). Where no
    single factor lands that near, layers take the two sides of the jump (`_straddled`). Raises
    ValueError naming the reachable range when the target is out of it, or when every selected layer's
    threshold is 0 (no factor changes anything)."""
    pricing = _pricing(target, pricing)
    layers, dense_params = _layers(params, rules, (1.0,), (0.0,))
    if not any(layer.options.threshold for layer in layers):
        raise ValueError("a uniform target scales the configured thresholds, and every selected layer's is 0; "
                         "set sd.threshold (e.g. 0.03), or pass sd.target_method=per_layer")
    sizes = {layer.name: layer.kernel.size for layer in layers}
    dense_total, fixed = pricing.dense_total(sizes, dense_params), pricing.fixed(sizes, dense_params)
    jobs = lambda factor, full: [
        TensorJob(layer.name, layer.kernel if full else layer.sample, layer.kind,
                  dataclasses.replace(layer.options, threshold=layer.options.threshold * factor)) for layer in layers]
    # Sampled and full calls padded apart: padded to the full sizes, a sampled call cost half a full one.
    padded = {full: compiled_sizes(jobs(1.0, full)) for full in (False, True)}

    def measured(factor: float, full: bool) -> tuple[list[float], list[TensorReport]]:
        reports = [result.report for result in _decompose(jobs(factor, full), padded[full])]
        return [float(pricing.costs(layer.name, [layer.stats(report_, full=full)])[0])
                for layer, report_ in zip(layers, reports)], reports

    seen: dict[float, float] = {}  # factor: the samples' total
    whole: dict[float, tuple[list[float], list[TensorReport]]] = {}  # factor: each whole layer's cost, reports
    sampled = lambda factor: seen[factor] if factor in seen else seen.setdefault(
        factor, fixed + sum(measured(factor, False)[0]))

    def total(factor: float) -> float:
        if factor not in whole:
            whole[factor] = measured(factor, True)
        return fixed + sum(whole[factor][0])

    def bisected(goal: float) -> float:
        # From the tightest bracket of the factors measured so far: above `low` every one costs <= goal.
        above = [factor for factor, cost in seen.items() if cost > goal]
        if not above or max(above) == factors[1]:
            return factors[1] if above else factors[0]
        low = max(above)
        high = min(factor for factor in seen if factor > low)
        while high / low > FACTOR_RESOLUTION:
            middle = math.sqrt(low * high)
            low, high = (middle, high) if sampled(middle) > goal else (low, middle)
        return min(low, high, key=lambda factor: abs(sampled(factor) - goal))

    reachable = _reach(target, dense_total, sampled(factors[1]), sampled(factors[0]))
    budget = target.budget(dense_total)
    if not sampled(factors[1]) <= budget < sampled(factors[0]):
        raise _out_of_range(target, reachable, sampled(factors[1]), sampled(factors[0]),
                            f"one factor {factors[0]:.3g} to {factors[1]:.3g} on the configured thresholds")
    goal = budget
    for _ in range(FULL_STEPS):
        factor = bisected(goal)
        if abs(total(factor) / budget - 1) <= UNIFORM_TOLERANCE:
            break
        goal = budget * sampled(factor) / total(factor)  # the samples' cost where the whole network's is the budget
    nearest = min(whole, key=lambda factor: abs(total(factor) - budget))
    sides = [nearest] * len(layers)
    if abs(total(nearest) / budget - 1) > UNIFORM_TOLERANCE:
        sides = _straddled(total, whole, budget, len(layers), factors)
    chosen_layers, chosen_rules = [], []
    for index, (layer, factor) in enumerate(zip(layers, sides)):
        options, cost, report_ = layer.options, whole[factor][0][index], whole[factor][1][index]
        chosen_layers.append(LayerChoice(layer.name, options.threshold * factor, options.prune_fraction, cost,
                                         report_.rel_error, options.threshold_scale))
        chosen_rules.append((f"^{re.escape(layer.name)}$", {
            **_first_rule(rules, layer.name), "threshold": options.threshold * factor,
            "threshold_scale": options.threshold_scale, "prune_fraction": options.prune_fraction}))
    total_cost = fixed + sum(choice.estimated_cost for choice in chosen_layers)
    return Allocation(target, tuple(chosen_rules), tuple(chosen_layers),
                      _reach(target, dense_total, total_cost, total_cost)[0], reachable)


def _straddled(total: Callable[[float], float], whole: Mapping[float, tuple[list[float], Any]], budget: float,
               count: int, factors: tuple[float, float]) -> list[float]:
    """Each layer's factor when no single one lands near the budget: every layer drops an exponent at
    nearly the same factor, so the total can jump past it (the MLP at threshold 0.03: 7.2x to 8.5x within
    2 % of the factor). The jump is bracketed on whole-network decompositions to `FACTOR_RESOLUTION`,
    then layers move from its costly side to its cheap side, the largest saving first, wherever that
    brings the total nearer the budget: thresholds stay within 0.3 % of one another."""
    costly = max((factor for factor in whole if total(factor) > budget), default=factors[0])
    cheap = min((factor for factor in whole if factor > costly), default=factors[1])
    while cheap / costly > FACTOR_RESOLUTION:
        middle = math.sqrt(costly * cheap)
        costly, cheap = (middle, cheap) if total(middle) > budget else (costly, middle)
    saving = [whole[costly][0][index] - whole[cheap][0][index] for index in range(count)]
    sides, current = [costly] * count, total(costly)
    for index in sorted(range(count), key=lambda index: saving[index], reverse=True):
        if abs(current - saving[index] - budget) < abs(current - budget):
            sides[index], current = cheap, current - saving[index]
    return sides


def calibrated_sensitivity(params: Any, rules: SDRules, loss: Callable[[Any], float], *,
                           threshold: float = MIDDLE_THRESHOLD) -> dict[str, float]:
    """{layer: sensitivity} for `allocate`: the increase of `loss` (a function of the parameter tree, e.g.
    the cross entropy on a calibration batch) when only that layer is decomposed at `threshold` layer RMS
    (the middle of the grid), over that decomposition's squared relative error, so that sensitivity times
    a candidate's squared error estimates the loss the candidate adds. Floored at a thousandth of the
    largest: a layer whose decomposition did not raise the loss still costs something."""
    layers = _layers(params, rules, (threshold,), (0.0,))[0]
    decompositions = _decompose([layer.job(*layer.grid[0], full=True) for layer in layers])
    base = loss(params)
    raw = {}
    for layer, decomposition in zip(layers, decompositions):
        weight, kernel = decomposition.reconstruct(), f"{layer.name}/kernel"
        only = jax.tree_util.tree_map_with_path(lambda path, x: weight if path_name(path) == kernel else x, params)
        raw[layer.name] = max(loss(only) - base, 0.0) / max(decomposition.report.rel_error ** 2, 1e-12)
    floor = 1e-3 * max(max(raw.values()), 1e-12)
    return {layer: max(value, floor) for layer, value in raw.items()}


def targeted_rules(config: Any, params: Any, pricing: Pricing | None = None,
                   calibration_loss: Callable[[Any], float] | None = None) -> tuple[SDRules, Allocation | None]:
    """The rules of `config`'s `sd` section, with the allocation for its target (if one is set; an energy
    target needs `pricing`) placed first, by the config's `sd.target_method` (`allocate` or `uniform`);
    the allocation too, for writing beside the run. With `calibration_loss` the layers of a per-layer
    allocation are weighted by `calibrated_sensitivity`."""
    rules = SDRules.from_config(config)
    target = SDRules.target_of(config)
    if target is None:
        return rules, None
    if SDRules.method_of(config) == "uniform":
        found = uniform(params, rules, target, pricing=pricing)
    else:
        sensitivity = None if calibration_loss is None else calibrated_sensitivity(params, rules, calibration_loss)
        found = allocate(params, rules, target, sensitivity, pricing=pricing)
    return found.sd_rules(rules), found


def allocation_path(output: str) -> str:
    """Where the allocation of a decomposition written to `output` goes: `<output>.sd_allocation.json`."""
    return f"{str(output).rstrip('/')}.{ALLOCATION_FILE}"
