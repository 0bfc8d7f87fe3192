"""A corrupted-file matrix (issue 13, item 7): every file kind sd_jax reads back x every kind of damage.

Each cell damages a freshly written file and reads it the way sd_jax does. It must be refused with one
`ValueError` line that names the file and says what to do, never load as a model (NaN-filled or not)
and never show raw TensorStore, zipfile or json internals; a damaged newest Orbax step instead falls
back to the previous good step with a warning naming the directory. Damage kinds:

    truncate  the file cut to half its length (a copy or write that stopped)
    flip      bytes in the middle of the file inverted (a bad disk or transfer)
    metadata  the part that describes the rest removed: the zip central directory of an .npz, Orbax's
              _METADATA, the header of a .sdpack, a required key of a JSON record
    version   a format version or magic changed: the .npy version, the OCDBT manifest's, the .sdpack's
              version and magic, a JSON record of another shape

Kinds without such a part have no cell for it (listed in `NOT_APPLICABLE` with the reason).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.core import blocking, packing
from sd_jax.cost import tables
from sd_jax.nn import structure
from sd_jax.train import workdir as run_files
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.step import create_train_state
from sd_jax.train.train_checkpoint import TrainCheckpoints

DAMAGES = ("truncate", "flip", "metadata", "version")
# Internals that must not reach the user (TensorStore's specs run to kilobytes).
INTERNALS = ("Traceback", "tensorstore_spec", "kvstore", "file_io_concurrency")


def _files(directory):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(directory) for name in names)


def _edit(path, change):
    with open(path, "rb") as stream:
        data = bytearray(stream.read())
    with open(path, "wb") as stream:
        stream.write(bytes(change(data)))


def _truncate(path):
    _edit(path, lambda data: data[:len(data) // 2])


def _flip(path, start=None, count=8):
    def flip(data):
        first = len(data) // 2 if start is None else start
        data[first:first + count] = bytes(byte ^ 0xFF for byte in data[first:first + count])
        return data
    _edit(path, flip)


def _array_files(directory):
    """The OCDBT data files of an Orbax save (where the arrays are)."""
    return [path for path in _files(directory) if f"{os.sep}d{os.sep}" in path]


# --- the file kinds: (write a good one, damage it, read it as sd_jax does) -------------------------------

def _variables():
    rng = np.random.default_rng(0)
    return {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
                       "head": {"kernel": rng.normal(size=(8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}}}


def _damage_npz(path, damage):
    if damage == "truncate":
        _truncate(path)
    elif damage == "flip":
        _flip(path)
    elif damage == "metadata":  # the central directory and its end record
        _edit(path, lambda data: data[:data.rfind(b"PK\x01\x02")])
    else:  # the .npy format version of every member: major version 9
        _edit(path, lambda data: data.replace(b"\x93NUMPY\x01", b"\x93NUMPY\x09"))


def _write_variables_npz(tmp_path):
    path = tmp_path / "variables.npz"
    sd_io.save_variables(path, _variables())
    return path


def _write_decomposed_npz(tmp_path):
    """The layout `--mode=decompose --output=x.npz` writes: SD collections and the JSON report."""
    path = tmp_path / "decomposed.npz"
    coeff = np.where(np.arange(24).reshape(2, 4, 3) % 3 == 0, 0.5, 0.0).astype(np.float32)
    sd_io.save_variables(path, {"params": {"head": {"bias": np.zeros(3, np.float32)}},
                                "sd_basis": {"head": {"basis": np.eye(3, dtype=np.float32)[None].repeat(2, 0)}},
                                "sd_coeff": {"head": {"coeff": coeff}}, "sd_mask": {"head": {"mask": coeff != 0}}},
                         report_json=json.dumps({"layers": []}))
    return path


def _damage_orbax_save(directory, damage):
    if damage == "truncate":
        for path in _array_files(directory):
            _truncate(path)
    elif damage == "flip":
        for path in _array_files(directory):
            _flip(path)
    elif damage == "metadata":
        for path in _files(directory):
            if os.path.basename(path) == "_METADATA":
                os.remove(path)
    else:  # the OCDBT manifest's version, just after its 4-byte magic
        for path in _files(directory):
            if os.path.basename(path) == "manifest.ocdbt":
                _flip(path, start=4, count=1)


def _write_orbax_save(tmp_path):
    """What `--mode=decompose --output=DIR` writes: a StandardCheckpointer save."""
    path = tmp_path / "variables_orbax"
    sd_io.save_variables(path, _variables())
    return path


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(3, name="head")(nn.Dense(8, name="hidden")(x))


def _train_state():
    model = _Net()
    variables = model.init(jax.random.key(0), jnp.ones((2, 5)), train=False)
    return create_train_state(model.apply, variables, sd_optimizer(0.1), jax.random.key(1))


def _write_train_checkpoints(tmp_path):
    """A run's `checkpoints` directory with steps 1 and 2."""
    directory = tmp_path / "checkpoints"
    checkpoints = TrainCheckpoints(directory, every_steps=1)
    state = _train_state()
    for step in (1, 2):
        state = state.replace(step=step, trainable=jax.tree.map(lambda x, s=step: x + s, state.trainable))
        checkpoints.save(step, state, data_state={"epoch": 0, "step": step})
    checkpoints.close()
    return directory


def _damage_newest_step(directory, damage):
    _damage_orbax_save(directory / "2" / "state", damage)


def _write_sdpack(tmp_path):
    spec = blocking.block_spec((6, 2), "dense")
    coeff = np.where(np.arange(np.prod(spec.block_shape)).reshape(spec.block_shape) % 2, 0.25, -2.0)
    tensor = packing.SDTensor(coeff.astype(np.float32), np.ones((spec.num_blocks, spec.k, spec.k), np.float32), spec)
    path = tmp_path / "model.sdpack"
    packing.save(str(path), {"head/kernel": tensor, "head/bias": np.arange(2, dtype=np.float32)})
    return path


def _damage_sdpack(path, damage):
    if damage == "truncate":
        _truncate(path)
    elif damage == "flip":
        _flip(path)
    elif damage == "metadata":  # the JSON header, its length kept
        header = packing.header_bytes(path.read_bytes()) - packing._PREFIX.size - 4
        _edit(path, lambda data: data[:packing._PREFIX.size] + b" " * header + data[packing._PREFIX.size + header:])
    else:
        _flip(path, start=8, count=1)  # the version (the magic is the first 8 bytes)


def _write_run_json(tmp_path):
    run_files.describe_run(tmp_path, ml_collections.ConfigDict({"seed": 0}))
    return tmp_path / run_files.RUN_FILE


def _damage_json(path, damage, required):
    if damage == "truncate":
        _truncate(path)
    elif damage == "flip":
        _flip(path, count=2)
    elif damage == "metadata":
        record = json.loads(path.read_text())
        del record[required]
        path.write_text(json.dumps(record))
    else:
        path.write_text(json.dumps([json.loads(path.read_text())]))  # a list, not the object


def _write_summary(tmp_path):
    path = tmp_path / run_files.SUMMARY_FILE
    path.write_text(json.dumps({"accuracy": 0.5, "loss": 1.0, "steps": 4}))
    return path


def _write_metrics(tmp_path):
    writer = run_files.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    return tmp_path / run_files.METRICS_FILE


def _damage_metrics(path, damage):
    lines = path.read_text().splitlines(keepends=True)
    if damage == "truncate":
        _truncate(path)
    elif damage == "flip":
        _flip(path, start=len(lines[0]) + 3, count=2)
    elif damage == "metadata":
        path.write_text(lines[0] + json.dumps({"loss": 0.5}) + "\n" + "".join(lines[2:]))  # a line without "step"
    else:
        path.write_text(lines[0] + "[1, 2]\n" + "".join(lines[2:]))


def _write_structure(tmp_path):
    path = tmp_path / "resnet20-structure-percentage.txt"
    path.write_text("".join(f"0.{i}5\n" for i in range(9)))
    return path


def _write_energy_table(tmp_path):
    path = tmp_path / "table.json"
    entries = {"dram": {"value": 640.0, "source": "Horowitz 2014", "word_bits": 32}, "mult_int8": {"value": 0.2, "source": "Horowitz"}}
    path.write_text(json.dumps({"name": "mine", "unit": "pJ", "entries": entries}))
    return path


# kind -> (write, damage, read); `read` must raise or, for Orbax steps, return the fallback.
KINDS = {
    "variables.npz": (_write_variables_npz, _damage_npz, inputs.read_variables),
    "decomposed.npz": (_write_decomposed_npz, _damage_npz, inputs.read_variables),
    "orbax save": (_write_orbax_save, _damage_orbax_save, inputs.read_variables),
    "sdpack": (_write_sdpack, _damage_sdpack, lambda path: packing.load(str(path))),
    "run.json": (_write_run_json, lambda path, damage: _damage_json(path, damage, "starts"),
                 lambda path: run_files.describe_run(path.parent, ml_collections.ConfigDict({"seed": 0}))),
    "summary.json": (_write_summary, lambda path, damage: _damage_json(path, damage, "accuracy"),
                     run_files.read_json),
    "metrics.jsonl": (_write_metrics, _damage_metrics,
                      lambda path: run_files.MetricsWriter(path.parent, resume_step=3).close()),
    "structure.txt": (_write_structure, lambda path, damage: (_truncate if damage == "truncate" else _flip)(path),
                      lambda path: structure.structure_rules(path, [f"layer{i}" for i in range(9)], model="test")),
    "energy table": (_write_energy_table, lambda path, damage: _damage_json(path, damage, "entries"),
                     lambda path: tables.load(str(path))),
}
NOT_APPLICABLE = {
    ("run.json", "metadata"): "one JSON object: nothing describes the rest (a missing history starts anew)",
    ("summary.json", "metadata"): "one JSON object: nothing describes the rest",
    ("structure.txt", "metadata"): "plain numbers, one a line: nothing describes the rest",
    ("structure.txt", "version"): "the authors' format has no version",
}
CELLS = [(kind, damage) for kind in KINDS for damage in DAMAGES if (kind, damage) not in NOT_APPLICABLE]


def _assert_one_clear_line(error, path):
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert not any(internal in message for internal in INTERNALS), message
    assert len(message) < 300 + 2 * len(str(path)), message  # the path, and the cause quoting it, aside


@pytest.mark.parametrize("kind, damage", CELLS)
def test_a_damaged_file_is_refused_with_one_line_naming_it(tmp_path, kind, damage):
    write, damage_file, read = KINDS[kind]
    path = write(tmp_path)
    read(path)  # the undamaged file reads
    damage_file(path, damage)
    with pytest.raises(ValueError) as error:
        read(path)
    _assert_one_clear_line(error.value, path)


@pytest.fixture(scope="module")
def train_checkpoints(tmp_path_factory):
    return _write_train_checkpoints(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_training_checkpoint_falls_back_to_the_previous_step(train_checkpoints, tmp_path, caplog,
                                                                              damage):
    directory = shutil.copytree(train_checkpoints, tmp_path / "checkpoints")
    _damage_newest_step(directory, damage)
    with caplog.at_level(logging.WARNING):
        state, data_state = TrainCheckpoints(directory, every_steps=1).restore(_train_state())
    assert int(state.step) == 1 and data_state["step"] == 1
    assert f"{directory}: checkpoint of step 2 does not restore" in caplog.text


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_given_as_params_falls_back_to_the_previous_step(train_checkpoints, tmp_path,
                                                                                    caplog, damage):
    directory = shutil.copytree(train_checkpoints, tmp_path / "checkpoints")
    _damage_newest_step(directory, damage)
    with caplog.at_level(logging.WARNING):
        variables = inputs.read_variables(str(directory))
    expected = jax.tree.map(lambda x: np.asarray(x) + 1, _train_state().trainable["params"])
    jax.tree.map(np.testing.assert_array_equal, variables["params"], expected)  # step 1's
    assert f"{directory}: step 2 does not restore" in caplog.text and "step 1" in caplog.text
    assert (directory / "2").exists()  # a command only reads: it deletes nothing


def test_every_checkpoint_step_damaged_is_one_line(train_checkpoints, tmp_path):
    directory = shutil.copytree(train_checkpoints, tmp_path / "checkpoints")
    for step in ("1", "2"):
        _damage_orbax_save(directory / step / "state", "truncate")
    with pytest.raises(ValueError) as error:
        inputs.read_variables(str(directory))
    _assert_one_clear_line(error.value, directory)
