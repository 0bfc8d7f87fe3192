"""Tests for sd_jax/core/allocation.py: the budgeted choice of one candidate per layer, and targets."""
import itertools

import numpy as np
import pytest

from sd_jax.core.allocation import Target, allocate


def _brute_force(costs, distortions, budget):
    choices = [c for c in itertools.product(*(range(len(c)) for c in costs))
               if sum(cost[j] for cost, j in zip(costs, c)) <= budget]
    return min(sum(d[j] for d, j in zip(distortions, c)) for c in choices)


def test_the_choice_fits_the_budget_and_is_close_to_the_best():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = [np.sort(rng.uniform(1, 10, 5))[::-1] for _ in range(4)]  # cheaper candidates distort more
        distortions = [np.sort(rng.uniform(0, 1, 5)) for _ in range(4)]
        budget = rng.uniform(sum(c.min() for c in costs), sum(c.max() for c in costs))
        choice = allocate(costs, distortions, budget)
        assert sum(c[j] for c, j in zip(costs, choice)) <= budget
        found = sum(d[j] for d, j in zip(distortions, choice))
        assert found <= _brute_force(costs, distortions, budget) + 0.35


def test_the_greedy_fill_spends_what_the_lagrangian_leaves():
    # Straight-line (cost, distortion) points: the Lagrangian hull gives all or nothing per layer.
    costs = [[1.0, 2.0, 3.0, 4.0]] * 2
    distortions = [[3.0, 2.0, 1.0, 0.0]] * 2
    choice = allocate(costs, distortions, 5.0)
    assert sum(costs[0][j] for j in choice) == 5.0


def test_a_budget_below_the_cheapest_choice_says_the_least_cost():
    with pytest.raises(ValueError, match="below the least total cost 2"):
        allocate([[1.0, 2.0], [1.0, 3.0]], [[1.0, 0.0], [1.0, 0.0]], 1.5)


def test_target_budget_and_checks():
    assert Target(compression=4).budget(320.0) == 80.0
    assert Target(bytes=10).budget(320.0) == 80.0
    assert Target(energy_ratio=0.25).budget(320.0) == 80.0
    assert Target(energy_ratio=0.25).describe() == "target_energy_ratio=0.25"
    assert Target().check() is None
    with pytest.raises(ValueError, match="set only one target"):
        Target(compression=4, bytes=10).check()
    with pytest.raises(ValueError, match="must be above 1"):
        Target(compression=0.5).check()
    with pytest.raises(ValueError, match="finite number >= 0"):
        Target(bytes=-1).check()
