"""Local builders for the offline copies: tiny fake files here, the real copies when present."""
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sd_jax import data
from sd_jax.data import builders

SINGLE = dict(process_index=0, process_count=1)
REAL_FASHION_MNIST = builders.FASHION_MNIST_DEFAULT_DIR
REAL_CIFAR10_JPEG = os.environ.get(builders.CIFAR10_JPEG_ENV, "/work/shared/data/cifar10-jpeg.tar.gz")


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_idx(tmp_path):
    """Fashion-MNIST-style IDX files: 24 train and 10 test images whose pixels encode index and label."""
    folder = tmp_path / "idx"
    folder.mkdir()
    contents = {}
    for split, count in (("train", 24), ("test", 10)):
        labels = np.arange(count) % 10
        images = np.stack([np.full((28, 28), 7 * i % 256) for i in range(count)]).astype(np.uint8)
        images[:, 0, 0] = labels  # tie the image to its label
        images_name, labels_name = builders.FASHION_MNIST_FILES[split]
        _write_idx(folder / images_name, images)
        _write_idx(folder / labels_name, labels)
        contents[split] = (images, labels)
    return folder, contents


def _jpeg(color):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def fake_cifar_tar(tmp_path):
    """A CIFAR-10 JPEG archive with 2 train and 1 test image per class, colour = class."""
    members = {}
    for label, class_name in enumerate(data.registry.CIFAR10_CLASSES):
        color = (25 * label, 255 - 25 * label, 128)
        for index in range(2):
            members[f"train/{class_name}/{index:04d}.jpg"] = _jpeg(color)
        members[f"test/{class_name}/0000.jpg"] = _jpeg(color)
    path = tmp_path / "cifar10-jpeg.tar.gz"
    _write_tar(path, members)
    return path


def test_fashion_mnist_from_idx_files(fake_idx, tmp_path):
    folder, contents = fake_idx
    data_dir = str(tmp_path / "prepared")
    data.prepare("fashion_mnist_idx", data_dir=data_dir, source=str(folder))
    data.prepare("fashion_mnist_idx", data_dir=data_dir, source=str(folder))  # idempotent
    for split in ("train", "test"):
        source = data.open_split("fashion_mnist_idx", split, data_dir)
        images, labels = contents[split]
        got = sorted((int(ex["label"]), ex["image"][..., 0].tobytes()) for ex in source)
        assert got == sorted((int(l), im.tobytes()) for im, l in zip(images, labels))  # lossless
    train = data.input_pipeline("fashion_mnist_idx", "train", batch_size=8, seed=0, data_dir=data_dir, **SINGLE)
    batch = next(train)
    assert batch["image"].shape == (8, 28, 28, 1) and train.steps_per_epoch == 3
    pixel = np.rint((batch["image"][:, 0, 0, 0] * 0.3530 + 0.2860) * 255).astype(int)
    np.testing.assert_array_equal(pixel, batch["label"])


def test_fashion_mnist_environment_variable(fake_idx, tmp_path, monkeypatch):
    folder, _ = fake_idx
    monkeypatch.setenv(builders.FASHION_MNIST_ENV, str(folder))
    monkeypatch.setenv(builders.DATA_DIR_ENV, str(tmp_path / "prepared"))
    data.prepare("fashion_mnist_idx")
    assert data.input_pipeline("fashion_mnist_idx", "test", batch_size=4, seed=0, **SINGLE).num_examples == 10


def test_cifar10_from_jpeg_archive(fake_cifar_tar, tmp_path, monkeypatch):
    monkeypatch.setenv(builders.CIFAR10_JPEG_ENV, str(fake_cifar_tar))
    data_dir = str(tmp_path / "prepared")
    data.prepare("cifar10_jpeg", data_dir=data_dir)
    evaluation = data.input_pipeline("cifar10_jpeg", "test", batch_size=4, seed=0, data_dir=data_dir, **SINGLE)
    assert evaluation.num_examples == 10
    source = data.open_split("cifar10_jpeg", "test", data_dir)
    for example in source:  # JPEG at quality 95 keeps a flat colour within a few levels
        label = int(example["label"])
        np.testing.assert_allclose(example["image"].mean(axis=(0, 1)), (25 * label, 255 - 25 * label, 128), atol=4)
    train = data.input_pipeline("cifar10_jpeg", "train", batch_size=4, seed=0, data_dir=data_dir,
                                setting="adaptation", part="target", **SINGLE)
    assert train.num_classes == 5 and train.num_examples == 10


def test_missing_fashion_mnist_names_the_apt_command(tmp_path):
    with pytest.raises(data.SourceNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.prepare("fashion_mnist_idx", data_dir=str(tmp_path), source=str(tmp_path / "nowhere"))


def test_missing_cifar_archive_names_the_recipe(tmp_path, monkeypatch):
    monkeypatch.delenv(builders.CIFAR10_JPEG_ENV, raising=False)
    with pytest.raises(data.SourceNotFoundError, match="set SD_JAX_CIFAR10_JPEG.*git clone"):
        data.prepare("cifar10_jpeg", data_dir=str(tmp_path))
    with pytest.raises(data.SourceNotFoundError, match="does not exist"):
        data.prepare("cifar10_jpeg", data_dir=str(tmp_path), source=str(tmp_path / "no.tar.gz"))


def test_unprepared_local_dataset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(builders.CIFAR10_JPEG_ENV, "/some/cifar10-jpeg.tar.gz")
    with pytest.raises(data.DatasetNotFoundError,
                       match="python -m sd_jax.data.prepare cifar10_jpeg --source /path/to/cifar10-jpeg.tar.gz"):
        data.input_pipeline("cifar10_jpeg", "train", batch_size=4, seed=0, data_dir=str(tmp_path), **SINGLE)


def test_truncated_idx_file(fake_idx, tmp_path):
    folder, _ = fake_idx
    path = folder / builders.FASHION_MNIST_FILES["train"][0]
    with gzip.open(path, "rb") as file:
        payload = file.read()
    with gzip.open(path, "wb") as file:
        file.write(payload[:-100])
    with pytest.raises(data.SourceNotFoundError, match="truncated"):
        data.prepare("fashion_mnist_idx", data_dir=str(tmp_path / "prepared"), source=str(folder))
    assert not (tmp_path / "prepared" / "fashion_mnist_idx" / "1.0.0").exists()  # nothing half-written


def test_not_gzip_idx_file(fake_idx, tmp_path):
    folder, _ = fake_idx
    (folder / builders.FASHION_MNIST_FILES["test"][1]).write_bytes(b"not gzip")
    with pytest.raises(data.SourceNotFoundError, match="not a readable gzip file"):
        data.prepare("fashion_mnist_idx", data_dir=str(tmp_path / "prepared"), source=str(folder))


@pytest.mark.parametrize("members, message", [
    ({"train/zebra/0000.jpg": _jpeg((0, 0, 0))}, "unknown class folder 'zebra'"),
    ({"train/cat/0000.jpg": b"not a jpeg"}, "is not a 32x32 RGB JPEG"),
    ({"train/cat/0000.jpg": _jpeg((0, 0, 0))}, "no test/<class>/"),
])
def test_bad_archive(tmp_path, members, message):
    path = tmp_path / "bad.tar.gz"
    _write_tar(path, members)
    with pytest.raises(data.SourceNotFoundError, match=message):
        data.prepare("cifar10_jpeg", data_dir=str(tmp_path / "prepared"), source=str(path))


def test_command_line(fake_idx, tmp_path):
    folder, _ = fake_idx
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    command = [sys.executable, "-m", "sd_jax.data.prepare", "fashion_mnist_idx",
               "--data_dir", str(tmp_path / "prepared"), "--source", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fashion_mnist_idx prepared in" in done.stdout
    done = subprocess.run(command[:4] + ["--data_dir", str(tmp_path / "other"), "--source", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "apt-get install -y dataset-fashion-mnist" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_MNIST),
                    reason=f"Fashion-MNIST IDX files absent ({REAL_FASHION_MNIST}); "
                           f"`{builders.FASHION_MNIST_INSTALL}` provides them")
def test_real_fashion_mnist(tmp_path):
    data_dir = str(tmp_path)
    data.prepare("fashion_mnist_idx", data_dir=data_dir)
    train = data.input_pipeline("fashion_mnist_idx", "train", batch_size=100, seed=0, data_dir=data_dir, **SINGLE)
    test = data.input_pipeline("fashion_mnist_idx", "test", batch_size=1000, seed=0, data_dir=data_dir, **SINGLE)
    assert (train.num_examples, test.num_examples) == (60_000, 10_000)
    labels = np.concatenate([b["label"] for b in test])
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    mean = np.mean([next(train)["image"].mean() for _ in range(20)])
    assert abs(mean) < 0.1  # normalised with Fashion-MNIST's mean and std


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(REAL_CIFAR10_JPEG),
                    reason=f"CIFAR-10 JPEG archive absent ({REAL_CIFAR10_JPEG}); set "
                           f"{builders.CIFAR10_JPEG_ENV} to it (recipe: {builders.CIFAR10_JPEG_RECIPE})")
def test_real_cifar10_jpeg(tmp_path):
    data_dir = str(tmp_path)
    data.prepare("cifar10_jpeg", data_dir=data_dir, source=REAL_CIFAR10_JPEG)
    train = data.input_pipeline("cifar10_jpeg", "train", batch_size=128, seed=0, data_dir=data_dir,
                                setting="finetune", **SINGLE)
    assert train.num_examples == 25_000
    test = data.input_pipeline("cifar10_jpeg", "test", batch_size=1000, seed=0, data_dir=data_dir, **SINGLE)
    batches = list(test)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    images = np.concatenate([b["image"] for b in batches])  # no augmentation: CIFAR-10's mean and std
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0, atol=0.05)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1, atol=0.05)
    assert next(train)["image"].shape == (128, 32, 32, 3)
