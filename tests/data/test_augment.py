"""Augmentation and normalisation: exact crops and flips for given draws, shapes, statistics."""
import numpy as np

from sd_jax.data import augment


def test_pad_crop_flip_is_exact():
    images = np.arange(2 * 5 * 6 * 1, dtype=np.uint8).reshape(2, 5, 6, 1)
    draws = np.array([[4, 4, 0], [0, 8, 1]])  # centre, no flip | top-right corner, flipped
    out = augment.pad_crop_flip(images, draws)
    np.testing.assert_array_equal(out[0], images[0])
    padded = np.pad(images[1], ((4, 4), (4, 4), (0, 0)))
    np.testing.assert_array_equal(out[1], padded[0:5, 8:14][:, ::-1])


def test_pad_crop_flip_draws_are_seeded():
    first = augment.draw_pad_crop_flip(np.random.default_rng(3), 64)
    np.testing.assert_array_equal(first, augment.draw_pad_crop_flip(np.random.default_rng(3), 64))
    assert first[:, :2].min() >= 0 and first[:, :2].max() <= 8 and set(first[:, 2]) == {0, 1}


def test_imagenet_crops_have_the_requested_size():
    rng = np.random.default_rng(0)
    for shape in [(40, 90, 3), (300, 20, 3), (7, 7, 1)]:
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        for draws in augment.draw_resized_crop(rng, 5):
            assert augment.random_resized_crop(image, draws, 16).shape == (16, 16, shape[2])
        assert augment.center_crop(image, 16).shape == (16, 16, shape[2])


def test_random_resized_crop_falls_back_to_center():
    image = np.zeros((10, 100, 3), np.uint8)
    draws = np.ones(augment.RESIZE_ATTEMPTS * 4 + 1) * 0.999  # every try too wide for the image
    assert augment.random_resized_crop(image, draws, 8).shape == (8, 8, 3)


def test_normalize_per_channel():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    images = np.full((1, 2, 2, 3), 255, np.uint8)
    out = augment.normalize(images, mean, std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)
