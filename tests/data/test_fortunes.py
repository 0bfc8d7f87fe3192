"""The fortunes_chars builder and text batches: tiny fake fortune files here, the Debian package when present."""
import os

import numpy as np
import pytest

from sd_jax import data
from sd_jax.data import builders, registry

SINGLE = dict(process_index=0, process_count=1)
CONTEXT = registry.FORTUNES_CONTEXT


@pytest.fixture
def fake_fortunes(tmp_path):
    """A fortunes folder of two files (plus a .dat index and a .u8 link the builder must skip)."""
    folder = tmp_path / "fortunes"
    folder.mkdir()
    fortunes = [f"Fortune number {i}: {'words ' * (i % 7 + 3)}\n\t\t-- someone\n".encode() for i in range(120)]
    (folder / "alpha").write_bytes(b"%\n".join(fortunes[:60]) + b"%\n")
    (folder / "beta").write_bytes(b"%\n".join(fortunes[60:]))
    (folder / "alpha.dat").write_bytes(b"\x00\x00\x00\x02 binary index")
    os.symlink(folder / "alpha", folder / "alpha.u8")
    return folder, fortunes


def test_split_fortunes_cuts_at_percent_lines():
    text = b"one\nline\n%\ntwo 100% sure\n%\n\n%\nthree"
    assert builders.split_fortunes(text) == [b"one\nline\n", b"two 100% sure\n", b"three\n"]


def test_fortune_split_is_a_seeded_hash():
    fortunes = [f"fortune {i}".encode() for i in range(2000)]
    splits = [builders.fortune_split(f) for f in fortunes]
    assert splits == [builders.fortune_split(f) for f in fortunes]  # a function of the text alone
    assert 0.07 < splits.count("validation") / len(splits) < 0.13  # about FORTUNES_VALIDATION_PERCENT
    # Pinned: SHA-256 gives these on every machine and Python version, so a prepared split never moves.
    assert [i for i, split in enumerate(splits[:200]) if split == "validation"] == [
        25, 50, 68, 78, 82, 109, 123, 126, 146, 149, 161, 163, 168, 169, 188]
    assert [builders.fortune_split(f, seed=1) for f in fortunes] != splits


def test_fortune_windows_cover_each_byte_once():
    windows = builders.fortune_windows([b"abc\n", b"defg\n"], context=4)  # stream "abc\n%\ndefg\n%\n" (13 bytes)
    stream = np.frombuffer(b"abc\n%\ndefg\n%\n", np.uint8)
    assert windows.shape == (3, 5) and windows.dtype == np.uint8
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), stream[1:13])
    np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])


def test_prepare_fake_fortunes_and_read_text_batches(fake_fortunes, tmp_path):
    folder, fortunes = fake_fortunes
    builders.prepare("fortunes_chars", data_dir=str(tmp_path / "prepared"), source=str(folder))
    expected = {split: builders.fortune_windows([f for f in fortunes if builders.fortune_split(f) == split], CONTEXT)
                for split in ("train", "validation")}
    evaluation = data.input_pipeline("fortunes_chars", "eval", batch_size=4, seed=0,
                                     data_dir=str(tmp_path / "prepared"), **SINGLE)
    batches = list(evaluation)
    tokens = np.concatenate([b["tokens"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert tokens.shape[1] == CONTEXT and tokens.dtype == np.int32
    assert sorted(map(bytes, np.concatenate([tokens, labels[:, -1:]], 1).astype(np.uint8))) == \
        sorted(map(bytes, expected["validation"]))
    train = data.input_pipeline("fortunes_chars", "train", batch_size=4, seed=0, data_dir=str(tmp_path / "prepared"),
                                **SINGLE)
    assert train.num_examples == len(expected["train"]) and train.num_classes == 256
    batch = next(train)
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["label"][:, :-1])


def test_missing_fortunes_package_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "FORTUNES_DEFAULT_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv(builders.FORTUNES_ENV, raising=False)
    with pytest.raises(builders.SourceNotFoundError, match="apt-get install -y fortunes"):
        builders.prepare("fortunes_chars", data_dir=str(tmp_path))
    assert "apt-get install -y fortunes" in builders.command("fortunes_chars")


def test_text_refuses_adaptation_and_device_placement(fake_fortunes, tmp_path):
    builders.prepare("fortunes_chars", data_dir=str(tmp_path), source=str(fake_fortunes[0]))
    with pytest.raises(ValueError, match="'plain' or 'finetune'"):
        data.input_pipeline("fortunes_chars", "train", batch_size=4, seed=0, setting="adaptation",
                            data_dir=str(tmp_path), **SINGLE)
    with pytest.raises(ValueError, match="placement='host'"):
        data.input_pipeline("fortunes_chars", "train", batch_size=4, seed=0, placement="device",
                            data_dir=str(tmp_path), **SINGLE)


@pytest.mark.skipif(not os.path.isdir(builders.FORTUNES_DEFAULT_DIR), reason="Debian package fortunes not installed")
def test_real_fortunes_split_sizes():
    files = builders.fortune_files()
    assert not any(name.endswith((".dat", ".u8")) for name in files)
    with open(files[0], "rb") as file:
        fortunes = builders.split_fortunes(file.read())
    assert fortunes and all(not f.startswith(b"%\n") for f in fortunes)
