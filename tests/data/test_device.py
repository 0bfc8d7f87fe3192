"""Device-resident splits (`placement="device"`): the host path's order, bitwise resume, any device count."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sd_jax import data
from sd_jax.data import device
from tests.data.batches import assert_same, take

SINGLE = dict(process_index=0, process_count=1)


def test_visits_the_host_paths_examples_in_its_order(mock):
    host = data.input_pipeline("mnist", "train", batch_size=48, seed=4, **SINGLE)
    on_device = data.input_pipeline("mnist", "train", batch_size=48, seed=4, placement="device", **SINGLE)
    batch = next(on_device)
    assert isinstance(batch["image"], jax.Array) and len(batch["image"].sharding.device_set) == jax.device_count()
    expected, got = take(host, 9), [batch] + take(on_device, 8)  # crosses the epoch boundary (4 steps)
    for a, b in zip(expected, got):  # MNIST is not augmented: the same images, bit for bit up to rounding
        np.testing.assert_array_equal(a["label"], np.asarray(b["label"]))
        np.testing.assert_allclose(a["image"], np.asarray(b["image"]), atol=1e-6)
    cifar_host = take(data.input_pipeline("cifar10", "train", batch_size=48, seed=4, **SINGLE), 9)
    cifar_device = take(data.input_pipeline("cifar10", "train", batch_size=48, seed=4, placement="device",
                                             **SINGLE), 9)
    for a, b in zip(cifar_host, cifar_device):  # augmented: the same labels, other crops
        np.testing.assert_array_equal(a["label"], b["label"])


def test_evaluation_batches_equal_the_host_paths_with_the_padding_mask(mock):
    host = list(data.input_pipeline("cifar10", "test", batch_size=64, seed=0, **SINGLE))
    on_device = [{key: np.asarray(value) for key, value in batch.items()}
                 for batch in data.input_pipeline("cifar10", "test", batch_size=64, seed=0, placement="device", **SINGLE)]
    assert len(on_device) == 4 and on_device[-1]["mask"].sum() == 200 - 3 * 64
    for a, b in zip(host, on_device):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
    assert not on_device[-1]["image"][~on_device[-1]["mask"]].any()


def test_resume_gives_identical_next_batches(mock):
    kwargs = dict(batch_size=24, seed=3, placement="device", **SINGLE)
    expected = take(data.input_pipeline("cifar10", "train", **kwargs), 12)  # 8 steps an epoch
    interrupted = data.input_pipeline("cifar10", "train", **kwargs)
    take(interrupted, 5)
    saved = json.loads(json.dumps(interrupted.get_state()))
    resumed = data.input_pipeline("cifar10", "train", **kwargs)
    resumed.set_state({key: np.asarray(value) for key, value in saved.items()})
    assert_same(take(resumed, 7), expected[5:])
    host = data.input_pipeline("cifar10", "train", batch_size=24, seed=3, **SINGLE)
    with pytest.raises(ValueError, match="saved by a pipeline with other arguments"):
        resumed.set_state(host.get_state())  # other augmentation draws: no silent switch of path


def test_batches_do_not_depend_on_the_device_or_process_count(mock):
    assert jax.device_count() == 8  # tests/conftest.py: 8 simulated CPU devices
    eight = data.input_pipeline("cifar10", "train", batch_size=32, seed=1, placement="device", **SINGLE)
    split = eight._on_device
    assert [shard.data.shape for shard in split.images.addressable_shards] == [(25, 32, 32, 3)] * 8
    one = data.input_pipeline("cifar10", "train", batch_size=32, seed=1, placement="device",
                              mesh=Mesh(np.array(jax.devices()[:1]), ("data",)), process_index=1, process_count=2)
    assert_same(take(eight, 3), take(one, 3))


def test_pad_crop_flip_takes_a_crop_of_the_padded_image_and_is_keyed():
    images = np.random.default_rng(0).integers(1, 256, (16, 6, 5, 2), dtype=np.uint8)
    key = jax.random.key(7)
    out = np.asarray(device.pad_crop_flip(images, key))
    np.testing.assert_array_equal(out, np.asarray(device.pad_crop_flip(images, key)))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for image, crop in zip(padded, out):
        crops = [image[y:y + 6, x:x + 5] for y in range(9) for x in range(9)]
        assert any(np.array_equal(crop, c) or np.array_equal(crop, c[:, ::-1]) for c in crops)
    assert not np.array_equal(out, np.asarray(device.pad_crop_flip(images, jax.random.key(8))))


def test_auto_placement_follows_the_byte_budget_and_the_device_count(mock):
    small = data.input_pipeline("cifar10", "train", batch_size=16, seed=0, placement="auto", **SINGLE)
    assert isinstance(next(small)["image"], jax.Array)
    over = data.input_pipeline("cifar10", "train", batch_size=16, seed=0, placement="auto", device_bytes=1000, **SINGLE)
    assert isinstance(next(over)["image"], np.ndarray)
    uneven = data.input_pipeline("cifar10", "train", batch_size=4, seed=0, placement="auto")  # 8 devices
    assert isinstance(next(uneven)["image"], np.ndarray)
    streamed = data.input_pipeline("imagenet2012", "train", batch_size=16, seed=0, placement="auto", image_size=16,
                                   **SINGLE)
    assert isinstance(next(streamed)["image"], np.ndarray)


@pytest.mark.parametrize("kwargs, message", [
    (dict(placement="gpu"), "pick one of host, device, auto"),
    (dict(name="imagenet2012", placement="device"), "cannot be held on the devices"),
    (dict(batch_size=20, placement="device"), "does not divide over the 8 devices"),
])
def test_bad_arguments(mock, kwargs, message):
    arguments = dict(name="cifar10", batch_size=32, seed=0, **SINGLE)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        data.input_pipeline(arguments.pop("name"), "train", **arguments)


@pytest.mark.slow
def test_two_processes_make_the_batches_of_one(tmp_path):
    from tests.train.test_multiprocess import _run

    single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
    _run("device_data", single, multi)  # 1 process with 4 devices, then 2 processes with 2 each
    with np.load(single) as one, np.load(multi) as two:
        assert int(one["devices"]) == int(two["devices"]) == int(two["holders"]) == 4
        assert set(one.files) == set(two.files)
        for key in one.files:
            np.testing.assert_array_equal(one[key], two[key], err_msg=key)
