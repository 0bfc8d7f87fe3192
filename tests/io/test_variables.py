import json
import os

import numpy as np
import pytest

from sd_jax.core.network import decompose_network
from sd_jax import io as sd_io


def _tree():
    rng = np.random.default_rng(0)
    return {"block": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 4)).astype(np.float32)}},
            "head": {"kernel": rng.normal(size=(12, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}


def test_npz_round_trip(tmp_path):
    path = str(tmp_path / "p.npz")
    sd_io.atomic_savez(path, sd_io.flatten(_tree()))
    loaded = sd_io.load_params(path)
    np.testing.assert_array_equal(loaded["head"]["kernel"], _tree()["head"]["kernel"])
    assert os.listdir(tmp_path) == ["p.npz"]  # no temporary left behind
    # zoo trees nest (stage1_block0/conv1): an .npz of slash-joined keys loads as the same tree
    np.testing.assert_array_equal(loaded["block"]["conv"]["kernel"], _tree()["block"]["conv"]["kernel"])


def test_orbax_checkpoint_and_manager_root_and_train_state(tmp_path):
    import orbax.checkpoint as ocp

    tree = _tree()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "plain"), tree)
    checkpointer.wait_until_finished()
    np.testing.assert_array_equal(sd_io.load_params(str(tmp_path / "plain"))["head"]["bias"], 0)
    manager = ocp.CheckpointManager(str(tmp_path / "run"))
    manager.save(7, args=ocp.args.StandardSave({"params": tree, "step": np.int32(7)}))
    manager.wait_until_finished()
    loaded = sd_io.load_params(str(tmp_path / "run"))
    assert set(loaded) == {"block", "head"}


def test_missing_and_corrupt_files_raise_clear_errors(tmp_path):
    with pytest.raises(sd_io.CheckpointError, match="no such file"):
        sd_io.load_params(str(tmp_path / "absent.npz"))
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(sd_io.CheckpointError, match="not a readable .npz"):
        sd_io.load_params(str(broken))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, weights=np.array([{"a": 1}], dtype=object))
    with pytest.raises(sd_io.CheckpointError, match="pickle"):
        sd_io.load_params(str(pickled))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(sd_io.CheckpointError, match="Orbax"):
        sd_io.load_params(str(tmp_path / "empty_dir"))


def test_save_decomposition_writes_the_layers_layout_and_report(tmp_path):
    """The decompose output is the SD model's variables (it wrote sd_coeff/<path>/kernel, which no layer reads)."""
    import flax.linen as nn

    from sd_jax.nn.layers import SDDense

    result = decompose_network({"head": {"kernel": _tree()["head"]["kernel"], "bias": np.zeros(3, np.float32)}})
    path = str(tmp_path / "sd.npz")
    sd_io.save_decomposition(path, result)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["__report__", "params/head/bias", "sd_basis/head/basis", "sd_coeff/head/coeff",
                                      "sd_mask/head/mask"]
        report = json.loads(str(data["__report__"]))
    assert report["total"]["decomposed_tensors"] == 1

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return SDDense(features=3, mode="pow2", name="head")(x)

    variables = sd_io.load_variables(path)
    x = np.ones((2, 12), np.float32)
    np.testing.assert_allclose(Net().apply(variables, x), x @ np.asarray(result.reconstruct()["head"]["kernel"]),
                               rtol=1e-5, atol=1e-5)


def test_files_of_the_earlier_sd_layout_are_converted_on_load(tmp_path):
    old = {"sd_coeff/block/conv/kernel": np.ones((2, 3, 3), np.float32),
           "sd_basis/block/conv/kernel": np.eye(3, dtype=np.float32)[None].repeat(2, 0),
           "sd_mask/block/conv/kernel": np.ones((2, 3, 3), bool), "params/block/conv/bias": np.zeros(2, np.float32)}
    np.savez(tmp_path / "old.npz", **old)
    variables = sd_io.load_variables(str(tmp_path / "old.npz"))
    assert sorted(sd_io.flatten(variables)) == ["params/block/conv/bias", "sd_basis/block/conv/basis",
                                                "sd_coeff/block/conv/coeff", "sd_mask/block/conv/mask"]
    np.savez(tmp_path / "scaled.npz", **old, **{"sd_row_scale/block/conv/kernel": np.ones((2, 3), np.float32)})
    with pytest.raises(sd_io.CheckpointError, match="row_scale"):
        sd_io.load_variables(str(tmp_path / "scaled.npz"))


def test_atomic_writes_leave_no_temporary_and_keep_the_old_file_on_failure(tmp_path):
    path = tmp_path / "deep" / "report.txt"
    sd_io.atomic_write_text(str(path), "one")
    assert path.read_text() == "one"

    def fail(stream):
        stream.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sd_io.atomic_write(str(path), fail)
    assert path.read_text() == "one" and os.listdir(path.parent) == ["report.txt"]


def test_paths_go_through_epath(tmp_path, monkeypatch):
    """Every read and write goes through etils.epath (local disks, gs:// alike): a relative path is
    made absolute, and an .npz round trip and an Orbax save work through an epath.Path."""
    from etils import epath

    monkeypatch.chdir(tmp_path)
    assert sd_io.as_path("runs/x") == epath.Path(tmp_path) / "runs" / "x"
    assert str(sd_io.as_path("gs://bucket/run")) == "gs://bucket/run"
    sd_io.save_variables(epath.Path("v.npz"), {"params": _tree()})
    sd_io.save_variables("orbax_dir", {"params": _tree()}, report_json='{"total": {}}')
    for name in ("v.npz", "orbax_dir"):
        loaded = sd_io.load_params(epath.Path(name))
        np.testing.assert_array_equal(loaded["head"]["kernel"], _tree()["head"]["kernel"])
    assert json.loads((tmp_path / "orbax_dir" / "sd_report.json").read_text()) == {"total": {}}
