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
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings.select(10, num_classes=10, **kwargs)


def test_example_split_needs_two_examples():
    with pytest.raises(ValueError, match="cannot split 1 example"):
        settings.example_split(1, seed=0)
