"""Structural pruning in sd_jax/core/decompose.py: the authors' criteria against a NumPy statement of
their rule (SmartDeal-Training/se/alg_structural.py, `smart_decompose`), and sd_jax's own rule."""
import math

import jax
import numpy as np
import pytest

import sd_jax
from sd_jax.core import blocking
from sd_jax.core.decompose import DecomposeOptions, reference_pruned_count, structural_keep
from sd_jax.core.network import decompose_network


def authors_keep(torch_weight: np.ndarray, prune_type: str, amount: float, group: int = 32) -> np.ndarray:
    """The entries the authors' structural pruning keeps, for a PyTorch weight (cout, cin, kh, kw).

    Facts of their code, restated: linear weights (rank 2) are left alone. A conv's units are its
    kernel rows (|W| summed over kw, flattened as (cin, kh)) when kw > 1, else its input channels.
    Filters go in consecutive groups of min(cout, 32); each group sums its filters' unit norms and
    sorts them ascending. 'population' zeroes the first ceil(units * amount) of that order; 'value'
    zeroes every unit whose sum is below amount; 'energy' walks the units by position from the last
    one down, adding their sums, stops at the first position where the added share of the total is
    >= amount, and zeroes that many units from the front of the ascending order.
    """
    keep = np.ones(torch_weight.shape, bool)
    if torch_weight.ndim == 2:
        return keep
    cout, cin, kh, kw = torch_weight.shape
    if kw > 1:
        norms = np.abs(torch_weight).sum(axis=-1).reshape(cout, cin * kh)
    else:
        norms = np.abs(torch_weight).reshape(cout, cin)
    size = min(cout, group)
    for start in range(0, cout, size):
        sums = norms[start:start + size].sum(axis=0)
        ascending = np.argsort(sums)
        if prune_type == "population":
            removed = list(ascending[:math.ceil(sums.size * amount)])
        elif prune_type == "value":
            removed = [unit for unit in range(sums.size) if sums[unit] < amount]
        else:
            total, running, stop = sum(sums), 0, 0
            for position in reversed(range(sums.size)):
                running += sums[position]
                stop = position
                if running / total >= amount:
                    break
            removed = list(ascending[:stop])
        unit_keep = np.ones(sums.size, bool)
        unit_keep[removed] = False
        keep[start:start + size] &= unit_keep.reshape(cin, kh if kw > 1 else 1, 1)
    return keep


def _torch(weight):
    """Flax (kh, kw, cin, cout) -> PyTorch (cout, cin, kh, kw)."""
    return np.transpose(weight, (3, 2, 0, 1))


def _weight(shape, seed):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def _keep_in_weight_layout(weight, kind, **options):
    spec = blocking.block_spec(weight.shape, kind)
    keep = structural_keep(weight, spec, DecomposeOptions(**options).validate())
    return blocking.from_blocks(keep.astype(np.float32), spec) > 0


def _value_threshold(weight, quantile):
    """A 'value' threshold that removes some units of the first group: a quantile of its unit norms."""
    torch_weight = _torch(weight)
    cout, cin, kh, kw = torch_weight.shape
    norms = np.abs(torch_weight).sum(-1).reshape(cout, -1) if kw > 1 else np.abs(torch_weight).reshape(cout, cin)
    return float(np.quantile(norms[:32].sum(0), quantile))


SHAPES = [((3, 3, 8, 40), "conv"),  # two groups of filters, 32 and 8
          ((3, 3, 5, 16), "conv"),  # fewer than 32 filters: one group
          ((3, 3, 81, 33), "conv"),  # two input-channel blocks of 41 (one padding channel), a group of 1
          ((1, 1, 20, 70), "conv"),  # 1 x 1: single input channels
          ((1, 1, 100, 8), "conv"),
          ((3, 3, 1, 40), "depthwise")]


@pytest.mark.parametrize("shape, kind", SHAPES)
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.45, 0.9])
def test_population_matches_the_authors_rule(shape, kind, fraction):
    weight = _weight(shape, seed=sum(shape))
    keep = _keep_in_weight_layout(weight, kind, prune_criterion="population", prune_fraction=fraction)
    np.testing.assert_array_equal(_torch(keep), authors_keep(_torch(weight), "population", fraction))


@pytest.mark.parametrize("shape, kind", SHAPES)
@pytest.mark.parametrize("quantile", [0.2, 0.6])
def test_value_matches_the_authors_rule(shape, kind, quantile):
    weight = _weight(shape, seed=sum(shape) + 1)
    threshold = _value_threshold(weight, quantile)
    keep = _keep_in_weight_layout(weight, kind, prune_criterion="value", prune_threshold=threshold)
    expected = authors_keep(_torch(weight), "value", threshold)
    assert not expected.all()
    np.testing.assert_array_equal(_torch(keep), expected)


@pytest.mark.parametrize("shape, kind", SHAPES)
@pytest.mark.parametrize("share", [0.3, 0.7, 0.95, 1.0])
def test_energy_matches_the_authors_rule(shape, kind, share):
    weight = _weight(shape, seed=sum(shape) + 2)
    keep = _keep_in_weight_layout(weight, kind, prune_criterion="energy", prune_threshold=share)
    np.testing.assert_array_equal(_torch(keep), authors_keep(_torch(weight), "energy", share))


def test_energy_counts_units_by_position_as_the_authors_loop_does():
    # Their loop adds unit norms from the last position down, not from the largest unit, so one
    # large unit at the front keeps every unit, and the same unit at the back prunes all others.
    assert reference_pruned_count(np.array([10.0, 1.0, 1.0, 1.0]), 0.5) == 0
    assert reference_pruned_count(np.array([1.0, 1.0, 1.0, 10.0]), 0.5) == 3
    assert reference_pruned_count(np.zeros(4), 0.5) == 0  # an all-zero group loses nothing


def test_population_rounds_the_pruned_count_up():
    # 3 x 3 kernel with 3 input channels: 9 kernel rows, 0.4 * 9 = 3.6 -> 4 pruned ('sd_jax': 3).
    weight = _weight((3, 3, 3, 8), seed=11)
    rows = lambda keep: np.transpose(keep, (3, 2, 0, 1))[0].all(axis=-1)  # (cin, kh) rows of filter 0
    reference = _keep_in_weight_layout(weight, "conv", prune_criterion="population", prune_fraction=0.4)
    ours = _keep_in_weight_layout(weight, "conv", prune_criterion="sd_jax", prune_fraction=0.4)
    assert int((~rows(reference)).sum()) == 4
    assert int((~rows(ours)).sum()) == 3
    # 1 x 1 with 10 input channels: 0.25 * 10 = 2.5 -> 3 channels pruned.
    one_by_one = _keep_in_weight_layout(_weight((1, 1, 10, 4), seed=12), "conv",
                                        prune_criterion="population", prune_fraction=0.25)
    assert int((~one_by_one[0, 0, :, 0]).sum()) == 3


def test_one_by_one_convs_lose_single_input_channels_not_rows_of_three():
    weight = _weight((1, 1, 20, 8), seed=13)
    keep = _keep_in_weight_layout(weight, "conv", prune_criterion="population", prune_fraction=0.25)
    pruned = ~keep[0, 0]  # (cin, cout)
    assert (pruned == pruned[:, :1]).all()  # one pattern for the group of 8 filters
    np.testing.assert_array_equal(np.flatnonzero(pruned[:, 0]), np.sort(np.argsort(np.abs(weight[0, 0]).sum(1))[:5]))


@pytest.mark.parametrize("criterion, amount", [("population", dict(prune_fraction=0.5)),
                                               ("value", dict(prune_threshold=1e9)),
                                               ("energy", dict(prune_threshold=0.01))])
def test_dense_layers_are_never_pruned_by_the_authors_criteria(criterion, amount):
    weight = _weight((60, 8), seed=14)
    assert _keep_in_weight_layout(weight, "dense", prune_criterion=criterion, **amount).all()
    pruned = sd_jax.decompose(weight, kind="dense", prune_criterion=criterion, **amount)
    plain = sd_jax.decompose(weight, kind="dense")
    np.testing.assert_array_equal(np.asarray(pruned.coeff), np.asarray(plain.coeff))


def test_zero_turns_every_criterion_off():
    weight = _weight((3, 3, 4, 8), seed=15)
    for criterion in ("population", "value", "energy"):
        assert _keep_in_weight_layout(weight, "conv", prune_criterion=criterion).all()


@pytest.mark.parametrize("shape", [(3, 3, 8, 40), (1, 1, 20, 40)])
def test_decomposition_fits_the_weight_the_authors_rule_prunes(shape):
    weight = _weight(shape, seed=16) * 0.1
    pruned = sd_jax.decompose(weight, kind="conv", threshold=1e-3, prune_criterion="population", prune_fraction=0.3)
    kept = np.transpose(authors_keep(_torch(weight), "population", 0.3), (2, 3, 1, 0))
    zeroed = sd_jax.decompose(np.where(kept, weight, 0.0), kind="conv", threshold=1e-3)
    np.testing.assert_array_equal(np.asarray(pruned.coeff), np.asarray(zeroed.coeff))
    np.testing.assert_array_equal(np.asarray(pruned.basis), np.asarray(zeroed.basis))
    if shape[0] == 3:  # pruned kernel rows are rows of C: exactly zero in the rebuilt weight
        np.testing.assert_array_equal(np.asarray(pruned.reconstruct())[~kept], 0.0)


def test_network_rules_choose_the_criterion_per_layer():
    params = {"block/conv": {"kernel": _weight((3, 3, 4, 8), seed=17) * 0.1},
              "block/project": {"kernel": _weight((1, 1, 12, 8), seed=18) * 0.1},
              "head/dense": {"kernel": _weight((12, 5), seed=19) * 0.1}}
    rule = {"prune_criterion": "population", "prune_fraction": 0.5}
    options = DecomposeOptions(threshold=0.0, **rule)
    kinds = {"block/conv/kernel": "conv", "block/project/kernel": "conv", "head/dense/kernel": "dense"}
    result = decompose_network(params, lambda path, shape: (kinds[path], options))
    conv = result.tree["block/conv"]["kernel"]
    rows = np.asarray(conv.coeff).any(axis=-1)  # (n, m): ceil(0.5 * 12) = 6 of 12 kernel rows remain
    assert rows.sum(axis=-1).tolist() == [6] * 8
    plain = decompose_network({"head/dense": params["head/dense"]}, threshold=0.0)
    np.testing.assert_array_equal(np.asarray(result.tree["head/dense"]["kernel"].coeff),
                                  np.asarray(plain.tree["head/dense"]["kernel"].coeff))


@pytest.mark.parametrize("options, message", [
    (dict(prune_criterion="l2"), "prune_criterion='l2' is not one of"),
    (dict(prune_criterion="population", prune_threshold=0.3), "set prune_fraction instead"),
    (dict(prune_criterion="sd_jax", prune_threshold=0.3), "set prune_fraction instead"),
    (dict(prune_criterion="value", prune_fraction=0.3), "set prune_threshold instead"),
    (dict(prune_criterion="energy", prune_threshold=1.5), "pass a number in \\[0, 1\\]"),
    (dict(prune_criterion="value", prune_threshold=-1.0), "prune_threshold=-1.0 must be a finite number >= 0"),
    (dict(prune_criterion="population", prune_fraction=1.0), "prune_fraction=1.0 must be in \\[0, 1\\)"),
])
def test_bad_pruning_options_raise_naming_the_option(options, message):
    with pytest.raises(ValueError, match=f"^layer 'x': .*{message}"):
        sd_jax.decompose(np.ones((3, 3, 2, 2), np.float32), kind="conv", name="layer 'x'", **options)
