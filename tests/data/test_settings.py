"""The paper's settings: seeded, disjoint and complete splits of classes and examples."""
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from sd_jax.data import settings


@given(num_classes=st.integers(2, 200), seed=st.integers(0, 2**31), data=st.data())
@hsettings(max_examples=50, deadline=None)
def test_class_split_disjoint_complete_and_seeded(num_classes, seed, data):
    source_classes = data.draw(st.integers(1, num_classes - 1))
    source, target = settings.class_split(num_classes, source_classes, seed)
    assert len(source) == source_classes and len(target) == num_classes - source_classes
    assert not set(source) & set(target)
    assert sorted(np.concatenate([source, target])) == list(range(num_classes))
    again = settings.class_split(num_classes, source_classes, seed)
    np.testing.assert_array_equal(source, again[0])


def test_example_split_is_25k_25k_for_cifar10():
    first, second = settings.example_split(50_000, seed=0)
    assert len(first) == len(second) == 25_000
    assert np.intersect1d(first, second).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.arange(50_000))
    other = settings.example_split(50_000, seed=1)[0]
    assert not np.array_equal(first, other)


def test_cifar_defaults_5_5_and_90_10():
    labels = np.repeat(np.arange(100), 3)
    source = settings.select(300, num_classes=100, setting="adaptation", part="source",
                             source_classes=90, labels=labels)
    target = settings.select(300, num_classes=100, setting="adaptation", part="target",
                             source_classes=90, labels=labels)
    assert source.num_classes == 90 and target.num_classes == 10
    assert np.intersect1d(source.indices, target.indices).size == 0
    np.testing.assert_array_equal(np.union1d(source.indices, target.indices), np.arange(300))
    # renumbered labels are 0..n-1 and point back to the original classes
    for selection in (source, target):
        new = selection.label_map[labels[selection.indices]]
        assert new.min() == 0 and new.max() == selection.num_classes - 1
        np.testing.assert_array_equal(selection.classes[new], labels[selection.indices])
    halves = settings.select(10, num_classes=10, setting="adaptation", labels=np.arange(10))
    assert halves.num_classes == 5


def test_finetune_keeps_eval_split_whole():
    selection = settings.select(7, num_classes=10, setting="finetune", part="target", is_train_split=False)
    np.testing.assert_array_equal(selection.indices, np.arange(7))


@pytest.mark.parametrize("kwargs, message", [
    (dict(setting="transfer"), "unknown setting 'transfer'"),
    (dict(part="left"), "unknown part 'left'"),
    (dict(setting="adaptation", labels=np.arange(10), source_classes=10), "source_classes=10"),
    (dict(setting="adaptation", labels=np.arange(10), source_classes=0), "source_classes=0"),
    (dict(setting="adaptation"), "needs the labels"),
    (dict(setting="adaptation", labels=np.arange(10) + 5), "labels range over 5..14"),
    (dict(setting="finetune", split_rule="authors"), "unknown split_rule 'authors'; pick one of sd_jax, reference"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings.select(10, num_classes=10, **kwargs)


def test_example_split_needs_two_examples():
    with pytest.raises(ValueError, match="cannot split 1 example"):
        settings.example_split(1, seed=0)


def test_reference_adaptation_is_the_authors_cifar10_split_with_labels_kept():
    labels = np.repeat(np.arange(10), 4)
    parts = {part: settings.select(40, num_classes=10, setting="adaptation", part=part, source_classes=5,
                                   labels=labels, split_rule="reference") for part in settings.PARTS}
    # SmartDeal-Training/main.py: np.random.seed(0); plabels = np.random.permutation(10)
    assert parts["source"].classes.tolist() == [2, 8, 4, 9, 1]
    assert parts["target"].classes.tolist() == [6, 7, 3, 0, 5]
    for part, selection in parts.items():
        assert selection.num_classes == 10  # the authors keep a 10-way classifier
        kept = labels[selection.indices]
        assert set(kept) == set(selection.classes)
        np.testing.assert_array_equal(selection.label_map[kept], kept)  # original labels
        assert (selection.label_map[np.setdiff1d(np.arange(10), selection.classes)] == -1).all()
        np.testing.assert_array_equal(selection.indices, np.flatnonzero(np.isin(labels, selection.classes)))


def test_reference_cifar100_adaptation_is_90_10_of_the_seed_0_permutation():
    labels = np.repeat(np.arange(100), 2)
    order = np.random.RandomState(0).permutation(100)  # main_c100.py: np.random.seed(0); permutation(100)
    source = settings.select(200, num_classes=100, setting="adaptation", source_classes=90, labels=labels,
                             split_rule="reference")
    target = settings.select(200, num_classes=100, setting="adaptation", part="target", source_classes=90,
                             labels=labels, split_rule="reference")
    np.testing.assert_array_equal(source.classes, order[:90])
    np.testing.assert_array_equal(target.classes, order[90:])
    assert source.num_classes == target.num_classes == 100


def test_reference_finetune_is_the_authors_25k_25k_split():
    order = np.random.RandomState(0).permutation(50_000)  # main.py: np.random.seed(0); permutation(50000)
    source = settings.select(50_000, num_classes=10, setting="finetune", split_rule="reference")
    target = settings.select(50_000, num_classes=10, setting="finetune", part="target", split_rule="reference")
    np.testing.assert_array_equal(source.indices, np.sort(order[:25_000]))
    np.testing.assert_array_equal(target.indices, np.sort(order[25_000:]))
    assert source.num_classes == 10
    whole = settings.select(10_000, num_classes=10, setting="finetune", is_train_split=False, split_rule="reference")
    np.testing.assert_array_equal(whole.indices, np.arange(10_000))


def test_reference_rule_draws_the_global_stream_without_touching_it():
    before = np.random.get_state()[1].copy()
    drawn = settings.class_split(10, 5, seed=3, split_rule="reference")
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.testing.assert_array_equal(np.concatenate(drawn), np.random.RandomState(3).permutation(10))


def test_sd_jax_rule_is_the_default_and_differs_from_the_reference():
    labels = np.repeat(np.arange(10), 2)
    default = settings.select(20, num_classes=10, setting="adaptation", labels=labels)
    explicit = settings.select(20, num_classes=10, setting="adaptation", labels=labels, split_rule="sd_jax")
    np.testing.assert_array_equal(default.classes, explicit.classes)
    assert default.num_classes == 5
    np.testing.assert_array_equal(default.classes, settings.class_split(10, 5, seed=0)[0])
    assert default.classes.tolist() != [2, 8, 4, 9, 1]  # its own stream, not the authors'


@pytest.mark.parametrize("split", [lambda: settings.class_split(10, 5, 0, "numpy"),
                                   lambda: settings.example_split(10, 0, "numpy")])
def test_split_functions_check_the_rule(split):
    with pytest.raises(ValueError, match="unknown split_rule 'numpy'; pick one of sd_jax, reference"):
        split()


@pytest.mark.parametrize("setting", ["plain", "adaptation", "finetune"])
@pytest.mark.parametrize("part", ["source", "target"])
@pytest.mark.parametrize("split_rule", ["sd_jax", "reference"])
def test_num_outputs_is_what_select_gives_without_the_labels(setting, part, split_rule):
    labels = np.arange(100) % 10
    selection = settings.select(100, num_classes=10, setting=setting, part=part, source_classes=4, labels=labels,
                                split_rule=split_rule)
    assert settings.num_outputs(10, setting=setting, part=part, source_classes=4,
                                split_rule=split_rule) == selection.num_classes
