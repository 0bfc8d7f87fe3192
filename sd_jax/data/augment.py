"""Standard image augmentation and normalisation in numpy.

Every random choice is drawn up front by the caller from an explicit `np.random.Generator` (for a
whole global batch) and passed in as arrays, so the result depends only on the seed and the batch
position, not on threads or on how the batch is split between processes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CIFAR_PAD = 4
RESIZE_ATTEMPTS = 10
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize the shorter side to size / 0.875, center crop


def draw_pad_crop_flip(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(batch, 3) int: crop offsets (y, x) in 0..2*CIFAR_PAD and a flip bit, for `pad_crop_flip`."""
    offsets = rng.integers(0, 2 * CIFAR_PAD + 1, size=(batch, 2))
    flips = rng.integers(0, 2, size=(batch, 1))
    return np.concatenate([offsets, flips], axis=1)


def pad_crop_flip(images: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """CIFAR augmentation: zero-pad by 4 pixels, crop back at the drawn offsets, maybe flip.

    images: (b, h, w, c) uint8; draws: (b, 3) from `draw_pad_crop_flip`. Returns (b, h, w, c).
    """
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)))
    rows = draws[:, 0, None] + np.arange(h)  # (b, h)
    cols = draws[:, 1, None] + np.arange(w)  # (b, w)
    cropped = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = draws[:, 2].astype(bool)[:, None, None, None]
    return np.where(flip, cropped[:, :, ::-1], cropped)


def draw_resized_crop(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(batch, RESIZE_ATTEMPTS * 4 + 1) uniforms in [0, 1) for `random_resized_crop`."""
    return rng.random((batch, RESIZE_ATTEMPTS * 4 + 1))


def random_resized_crop(image: np.ndarray, draws: np.ndarray, size: int) -> np.ndarray:
    """ImageNet training crop (Inception style): a random box of 8-100 % of the area and aspect
    ratio 3/4-4/3 (up to 10 tries, else a center crop), resized bilinearly to size x size, then
    a horizontal flip with probability 1/2. image: (h, w, c) uint8; draws: one row of
    `draw_resized_crop`."""
    height, width = image.shape[:2]
    area = height * width
    box = None
    for attempt in draws[:-1].reshape(RESIZE_ATTEMPTS, 4):
        target_area = area * (CROP_SCALE[0] + attempt[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
        log_ratio = math.log(CROP_RATIO[0]) + attempt[1] * math.log(CROP_RATIO[1] / CROP_RATIO[0])
        ratio = math.exp(log_ratio)
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(attempt[2] * (height - h + 1))
            left = int(attempt[3] * (width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:  # fall back to the largest center box with a ratio inside CROP_RATIO
        ratio = width / height
        if ratio < CROP_RATIO[0]:
            w, h = width, int(round(width / CROP_RATIO[0]))
        elif ratio > CROP_RATIO[1]:
            w, h = int(round(height * CROP_RATIO[1])), height
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    crop = _resize(image[top:top + h, left:left + w], size, size)
    return crop[:, ::-1] if draws[-1] < 0.5 else crop


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ImageNet evaluation: resize the shorter side to size / 0.875, take the central size x size."""
    height, width = image.shape[:2]
    shorter = int(round(size / EVAL_CROP_FRACTION))
    scale = shorter / min(height, width)
    new_h, new_w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
    resized = _resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (h, w, c) uint8 image (PIL, which releases the GIL)."""
    channels = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out.reshape(height, width, channels)


def normalization(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift) per channel such that x * scale - shift = (x / 255 - mean) / std; the
    host and the device paths normalise with the same two constants."""
    scale = np.float32(1 / 255) / np.asarray(std, np.float32)
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return scale, shift


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (..., c) -> float32 (x / 255 - mean) / std per channel."""
    scale, shift = normalization(mean, std)
    return images.astype(np.float32) * scale - shift
