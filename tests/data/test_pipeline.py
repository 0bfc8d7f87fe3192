"""Pipelines on the built-in TFDS names, with `tfds.testing.mock_data` (no TensorFlow, no files)."""
import json

import numpy as np
import pytest

from sd_jax import data
from tests.data.batches import assert_same, take

SINGLE = dict(process_index=0, process_count=1)


@pytest.mark.parametrize("name, shape, classes", [
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100), ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10), ("imagenet2012", (24, 24, 3), 1000),
])
def test_batches_have_fixed_shapes_and_types(mock, name, shape, classes):
    size = {"image_size": 24} if name == "imagenet2012" else {}
    train = data.input_pipeline(name, "train", batch_size=16, seed=0, **size, **SINGLE)
    batch = next(train)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16,) + shape and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < classes
    assert train.steps_per_epoch == 200 // 16 and train.num_classes == classes
    evaluation = data.input_pipeline(name, "eval", batch_size=64, seed=0, **size, **SINGLE)
    batches = list(evaluation)
    assert len(batches) == 4 and all(b["image"].shape == (64,) + shape for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == 200
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()


def test_cifar_normalised_roughly_zero_mean(mock):
    evaluation = data.input_pipeline("cifar10", "test", batch_size=200, seed=0, **SINGLE)
    images = next(evaluation)["image"]  # mock pixels are uniform, so the mean is about (0.5-m)/s
    expected = (0.5 - np.array(data.get("cifar10").mean)) / np.array(data.get("cifar10").std)
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), expected, atol=0.1)


def test_deterministic_for_a_seed(mock):
    first = take(data.input_pipeline("cifar10", "train", batch_size=32, seed=7, **SINGLE), 8)
    second = take(data.input_pipeline("cifar10", "train", batch_size=32, seed=7, **SINGLE), 8)
    assert_same(first, second)
    other = take(data.input_pipeline("cifar10", "train", batch_size=32, seed=8, **SINGLE), 1)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_epochs_shuffle_differently_and_cover_the_data_once(mock):
    train = data.input_pipeline("mnist", "train", batch_size=50, seed=0, **SINGLE)
    epochs = [np.concatenate([b["image"] for b in take(train, 4)]) for _ in range(2)]
    assert not np.array_equal(epochs[0], epochs[1])
    in_order = data.input_pipeline("mnist", "train", batch_size=200, seed=0, training=False, **SINGLE)
    evaluation = np.concatenate([b["image"] for b in in_order])
    for epoch in epochs:  # no augmentation for MNIST: each epoch is a permutation of the split
        assert sorted(map(bytes, epoch)) == sorted(map(bytes, evaluation))


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_resume_gives_identical_next_batches(mock, name):
    kwargs = dict(batch_size=24, seed=3, image_size=16 if name == "imagenet2012" else None, **SINGLE)
    uninterrupted = data.input_pipeline(name, "train", **kwargs)
    expected = take(uninterrupted, 12)  # crosses the epoch boundary (8 steps per epoch)
    interrupted = data.input_pipeline(name, "train", **kwargs)
    take(interrupted, 5)
    saved = json.loads(json.dumps(interrupted.get_state()))
    resumed = data.input_pipeline(name, "train", **kwargs)
    resumed.set_state({key: np.asarray(value) for key, value in saved.items()})  # as restored arrays
    assert_same(take(resumed, 7), expected[5:])


def test_state_survives_an_orbax_checkpoint(mock, tmp_path):
    import orbax.checkpoint as ocp

    train = data.input_pipeline("cifar10", "train", batch_size=40, seed=1, **SINGLE)
    expected = take(data.input_pipeline("cifar10", "train", batch_size=40, seed=1, **SINGLE), 3)
    take(train, 2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"data": train.get_state()})
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt")
    resumed = data.input_pipeline("cifar10", "train", batch_size=40, seed=1, **SINGLE)
    resumed.set_state(restored["data"])
    assert_same([next(resumed)], expected[2:])


@pytest.mark.parametrize("training", [True, False])
def test_process_shards_make_up_the_single_process_batch(mock, training):
    split = "train" if training else "test"
    whole = take(data.input_pipeline("cifar10", split, batch_size=48, seed=5, training=training, **SINGLE), 4)
    shards = [
        take(data.input_pipeline("cifar10", split, batch_size=48, seed=5, training=training,
                                  process_index=index, process_count=4), 4)
        for index in range(4)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), batch[key])


def test_resume_with_another_process_count(mock):
    expected = take(data.input_pipeline("cifar10", "train", batch_size=32, seed=2, **SINGLE), 4)
    first = data.input_pipeline("cifar10", "train", batch_size=32, seed=2, **SINGLE)
    take(first, 3)
    shard = data.input_pipeline("cifar10", "train", batch_size=32, seed=2, process_index=1, process_count=2)
    shard.set_state(first.get_state())
    np.testing.assert_array_equal(next(shard)["image"], expected[3]["image"][16:])


def test_adaptation_parts_are_disjoint_and_complete(mock):
    def labels_of(part, split):
        pipeline = data.input_pipeline("cifar10", split, batch_size=1, seed=0, training=False,
                                       setting="adaptation", part=part, split_seed=4, **SINGLE)
        labels = np.concatenate([b["label"] for b in pipeline])
        return pipeline, pipeline.selection.classes[labels], pipeline.selection.indices

    source, source_classes, source_indices = labels_of("source", "train")
    target, target_classes, target_indices = labels_of("target", "train")
    assert source.num_classes == target.num_classes == 5
    assert not set(source_classes) & set(target_classes)
    assert set(source_classes) | set(target_classes) == set(range(10))
    np.testing.assert_array_equal(np.union1d(source_indices, target_indices), np.arange(200))
    assert np.intersect1d(source_indices, target_indices).size == 0
    _, eval_classes, _ = labels_of("target", "test")
    assert set(eval_classes) <= set(target.selection.classes)


def test_cifar100_adaptation_is_90_10(mock):
    source = data.input_pipeline("cifar100", "train", batch_size=8, seed=0, setting="adaptation", **SINGLE)
    target = data.input_pipeline("cifar100", "train", batch_size=8, seed=0, setting="adaptation",
                                 part="target", **SINGLE)
    assert (source.num_classes, target.num_classes) == (90, 10)
    assert next(target)["label"].max() < 10


def test_finetune_halves_are_disjoint_and_complete(mock):
    halves = [
        data.input_pipeline("cifar10", "train", batch_size=10, seed=0, setting="finetune", part=part, **SINGLE)
        for part in ("source", "target")
    ]
    assert [h.num_examples for h in halves] == [100, 100]
    assert np.intersect1d(halves[0].selection.indices, halves[1].selection.indices).size == 0
    np.testing.assert_array_equal(
        np.union1d(halves[0].selection.indices, halves[1].selection.indices), np.arange(200))
    test = data.input_pipeline("cifar10", "test", batch_size=10, seed=0, setting="finetune", **SINGLE)
    assert test.num_examples == 200


def test_reference_adaptation_keeps_the_authors_classes_and_labels(mock):
    def labels_of(part, split):
        pipeline = data.input_pipeline("cifar10", split, batch_size=1, seed=0, training=False, setting="adaptation",
                                       part=part, split_rule="reference", **SINGLE)
        return pipeline, np.concatenate([b["label"][b["mask"]] for b in pipeline])

    for part, classes in (("source", [2, 8, 4, 9, 1]), ("target", [6, 7, 3, 0, 5])):
        for split in ("train", "test"):
            pipeline, labels = labels_of(part, split)
            assert pipeline.num_classes == 10 and pipeline.selection.classes.tolist() == classes
            assert set(labels) == set(classes)  # original labels, test split filtered the same way


def test_reference_cifar100_adaptation_is_90_10_with_100_outputs(mock):
    target = data.input_pipeline("cifar100", "train", batch_size=8, seed=0, setting="adaptation", part="target",
                                 split_rule="reference", **SINGLE)
    assert target.num_classes == 100
    assert set(next(target)["label"]) <= set(np.random.RandomState(0).permutation(100)[90:])


def test_reference_finetune_halves_and_state_are_their_own(mock):
    reference = data.input_pipeline("cifar10", "train", batch_size=10, seed=0, setting="finetune",
                                    split_rule="reference", **SINGLE)
    np.testing.assert_array_equal(reference.selection.indices, np.sort(np.random.RandomState(0).permutation(200)[:100]))
    ours = data.input_pipeline("cifar10", "train", batch_size=10, seed=0, setting="finetune", **SINGLE)
    with pytest.raises(ValueError, match="saved by a pipeline with other arguments"):
        ours.set_state(reference.get_state())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(name="svhn"), ValueError, "unknown dataset 'svhn'"),
    (dict(split="validation"), ValueError, "has splits 'train' and 'test'"),
    (dict(batch_size=30, process_count=4, process_index=0), ValueError, "multiple of process_count=4"),
    (dict(process_index=2, process_count=2), ValueError, "process_index=2"),
    (dict(batch_size=500), ValueError, "larger than the 200 examples"),
    (dict(setting="transfer"), ValueError, "unknown setting"),
    (dict(image_size=64), ValueError, "drop image_size=64"),
    (dict(name="imagenet2012", setting="adaptation"), ValueError, "meant for CIFAR-sized data"),
    (dict(num_epochs=0), ValueError, "num_epochs=0"),
    (dict(prefetch=-1), ValueError, "prefetch=-1 must be 0"),
    (dict(split_rule="authors"), ValueError, "unknown split_rule 'authors'; pick one of sd_jax, reference"),
])
def test_bad_arguments(mock, kwargs, error, message):
    arguments = dict(name="cifar10", split="train", batch_size=32, seed=0, **SINGLE)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        data.input_pipeline(arguments.pop("name"), arguments.pop("split"), **arguments)


def test_state_from_another_pipeline_is_refused(mock):
    train = data.input_pipeline("cifar10", "train", batch_size=32, seed=0, **SINGLE)
    other = data.input_pipeline("cifar10", "train", batch_size=32, seed=1, **SINGLE)
    with pytest.raises(ValueError, match="saved by a pipeline with other arguments"):
        train.set_state(other.get_state())
    with pytest.raises(ValueError, match="expected"):
        train.set_state({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        train.set_state(dict(train.get_state(), step=99))


def test_unprepared_dataset_names_the_command(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="python -m sd_jax.data.prepare cifar10 --data_dir"):
        data.input_pipeline("cifar10", "train", batch_size=8, seed=0, data_dir=str(tmp_path), **SINGLE)


def test_background_workers_give_the_same_batches_with_one_persistent_pool(mock):
    import threading

    kwargs = dict(batch_size=16, seed=2, image_size=16, **SINGLE)
    inline = take(data.input_pipeline("imagenet2012", "train", prefetch=0, **kwargs), 14)
    workers = data.input_pipeline("imagenet2012", "train", prefetch=3, num_threads=2, **kwargs)
    assert_same(take(workers, 3), inline[:3])
    threads = threading.active_count()
    assert_same(take(workers, 11), inline[3:])  # crosses the epoch boundary (12 steps an epoch)
    assert threading.active_count() <= threads  # no new threads per batch: 1 maker + 2 decoders at most


def test_a_copy_is_a_second_cursor(mock):
    import copy

    train = data.input_pipeline("cifar10", "train", batch_size=40, seed=1, **SINGLE)
    expected = take(data.input_pipeline("cifar10", "train", batch_size=40, seed=1, **SINGLE), 7)
    take(train, 2)
    cursor = copy.copy(train)
    cursor.set_state(dict(train.get_state(), epoch=1, step=0))
    assert_same(take(cursor, 2), expected[5:7])
    assert_same(take(train, 3), expected[2:5])
