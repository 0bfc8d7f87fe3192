"""Budgeted allocation: one setting per layer, least total distortion within a budget.

Each layer offers candidate settings, each with a cost (storage bits, or inference energy) and a distortion (e.g. its
squared relative reconstruction error times the layer's sensitivity). `allocate` picks one candidate
per layer so that the total cost stays within the budget and the summed distortion is small.

The method is the Lagrangian one of rate-distortion allocation, then a greedy fill:
  1. for a multiplier lambda every layer independently takes argmin distortion + lambda * cost; the
     total cost falls as lambda grows, so bisection finds the smallest lambda whose choice fits the
     budget (its choice is optimal for its own total cost, Everett's theorem);
  2. the Lagrangian reaches only the lower convex hull of each layer's (cost, distortion) points, so
     the chosen total can lie well below the budget when the hull has few points; the greedy fill then
     repeatedly switches the layer whose move to a costlier, no more distorted candidate buys the most
     distortion per bit and still fits, until none fits (moves that buy nothing still spend the budget:
     the user asked for that size). The total then lands at the budget within
     about one candidate's step, which a fine candidate grid makes small.
Layers are independent, so this is linear in layers times candidates per bisection step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

BISECTION_STEPS = 100


@dataclasses.dataclass(frozen=True)
class Target:
    """What the user asks for; 0 means unset, and at most one may be set.

    compression: dense 32-bit storage of the whole network over its SD storage (the ratio the decompose
        report prints), e.g. 12.
    bytes: total storage in bytes of the SD network (dense leftovers at 32 bits included).
    energy_ratio: inference energy of the SD network over the dense float32 network's, as the analyzer
        (`sd_jax.cost`) prices them, e.g. 0.8.
    """

    compression: float = 0.0
    bytes: float = 0.0
    energy_ratio: float = 0.0

    def check(self) -> "Target | None":
        """The target when one is set, None when none is; ValueError for two, or a negative or non-finite one."""
        values = {f"target_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in values.items():
            if value is None or not np.isfinite(value) or value < 0:
                raise ValueError(f"sd.{key}={value!r} must be a finite number >= 0 (0 turns it off)")
        chosen = [key for key, value in values.items() if value]
        if len(chosen) > 1:
            raise ValueError(f"sd.{chosen[0]} and sd.{chosen[1]} are both set; set only one target (0 turns one off)")
        if self.compression and self.compression <= 1:
            raise ValueError(f"sd.target_compression={self.compression} must be above 1 (dense storage is 1x)")
        return self if chosen else None

    @property
    def counts_energy(self) -> bool:
        """True when the target is an inference energy, False when it is a storage."""
        return bool(self.energy_ratio)

    def budget(self, dense_total: float) -> float:
        """The budget (storage bits, or energy) of a network whose dense total (32-bit storage in bits, or
        float32 inference energy) is `dense_total`."""
        if self.energy_ratio:
            return dense_total * self.energy_ratio
        return dense_total / self.compression if self.compression else 8.0 * self.bytes

    def describe(self) -> str:
        """'target_compression=12', 'target_bytes=1e6' or 'target_energy_ratio=0.8', for messages."""
        name = next(f.name for f in dataclasses.fields(self) if getattr(self, f.name))
        return f"target_{name}={getattr(self, name):g}"


def _lagrangian_choice(costs: list[np.ndarray], distortions: list[np.ndarray], multiplier: float) -> list[int]:
    return [int(np.argmin(d + multiplier * c)) for c, d in zip(costs, distortions)]


def _total(costs: list[np.ndarray], choice: list[int]) -> float:
    return float(sum(c[i] for c, i in zip(costs, choice)))


def allocate(costs: Sequence[Sequence[float]], distortions: Sequence[Sequence[float]], budget: float) -> list[int]:
    """The candidate index of each layer: total cost <= `budget`, summed distortion small (see module doc).

    `costs[l][j]`, `distortions[l][j]`: cost and distortion of candidate j of layer l. Raises ValueError
    when even the cheapest candidates exceed the budget."""
    costs = [np.asarray(c, np.float64) for c in costs]
    distortions = [np.asarray(d, np.float64) for d in distortions]
    cheapest = [int(np.argmin(c + 1e-12 * d)) for c, d in zip(costs, distortions)]
    if _total(costs, cheapest) > budget:
        raise ValueError(f"budget {budget:.6g} is below the least total cost {_total(costs, cheapest):.6g}")
    spread = max(float(np.ptp(d)) for d in distortions) or 1.0
    scale = max(float(np.ptp(c)) for c in costs) or 1.0
    low, high = 0.0, spread / scale * 1e3
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if _total(costs, _lagrangian_choice(costs, distortions, middle)) <= budget:
            high = middle
        else:
            low = middle
    choice = _lagrangian_choice(costs, distortions, high)
    if _total(costs, choice) > budget:
        choice = cheapest
    return _greedy_fill(costs, distortions, choice, budget)


def _greedy_fill(costs: list[np.ndarray], distortions: list[np.ndarray], choice: list[int], budget: float) -> list[int]:
    choice = list(choice)
    spare = budget - _total(costs, choice)
    while True:
        best, best_gain = None, -1.0
        for layer, (c, d) in enumerate(zip(costs, distortions)):
            extra = c - c[choice[layer]]
            gain = d[choice[layer]] - d
            fits = (extra > 0) & (extra <= spare) & (gain >= 0)
            if fits.any():
                rate = np.where(fits, gain / np.where(extra > 0, extra, 1.0), -np.inf)
                j = int(np.argmax(rate))
                if rate[j] > best_gain:
                    best, best_gain = (layer, j), rate[j]
        if best is None:
            return choice
        layer, j = best
        spare -= costs[layer][j] - costs[layer][choice[layer]]
        choice[layer] = j
