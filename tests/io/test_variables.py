import json
import os

import numpy as np
import pytest

from sd_jax.core.network import decompose_network
from sd_jax import io as sd_io


def _tree():
    rng = np.random.default_rng(0)
    return {"block/conv": {"kernel": rng.normal(size=(3, 3, 4, 4)).astype(np.float32)},
            "head": {"kernel": rng.normal(size=(12, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}


def test_npz_round_trip(tmp_path):
    path = str(tmp_path / "p.npz")
    sd_io.atomic_savez(path, sd_io.flatten(_tree()))
    loaded = sd_io.load_params(path)
    np.testing.assert_array_equal(loaded["head"]["kernel"], _tree()["head"]["kernel"])
    assert os.listdir(tmp_path) == ["p.npz"]  # no temporary left behind
    # "block/conv" comes back nested one level deeper; arrange_like restores the model's nesting
    assert "conv" in loaded["block"]
    arranged = sd_io.arrange_like(loaded, _tree())
    assert set(arranged) == {"block/conv", "head"}
    np.testing.assert_array_equal(arranged["block/conv"]["kernel"], _tree()["block/conv"]["kernel"])
    other = {"head": _tree()["head"]}
    assert sd_io.arrange_like(loaded, other) is loaded  # other paths: left for the caller to report


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
    assert set(loaded) == {"block/conv", "head"}


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


def test_save_decomposition_writes_collections_and_report(tmp_path):
    result = decompose_network(_tree())
    path = str(tmp_path / "sd.npz")
    sd_io.save_decomposition(path, result)
    with np.load(path, allow_pickle=False) as data:
        assert "sd_coeff/block/conv/kernel" in data.files and "params/head/bias" in data.files
        report = json.loads(str(data["__report__"]))
        np.testing.assert_array_equal(data["sd_mask/head/kernel"], data["sd_coeff/head/kernel"] != 0)
    assert report["total"]["decomposed_tensors"] == 2
