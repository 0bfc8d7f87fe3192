"""Every command (decompose, analyze, export, evaluate) with a training config and every input kind: a
dense .npz of bare parameters, a dense Orbax training checkpoint, an SD Orbax training checkpoint, and
the .npz `decompose` writes; and an adaptation run, whose classifier has the target part's classes."""

import json
import os

import numpy as np
import pytest

from sd_jax import commands
from sd_jax import io as sd_io
from sd_jax import serve
from sd_jax.commands import inputs
from sd_jax.core import packing
from sd_jax.nn import allocate
from sd_jax.nn.rules import SDRules
from sd_jax.train import trainer
from tests.train.tiny_config import tiny_config

KINDS = ("dense_npz", "dense_orbax", "sd_orbax", "decomposed_npz")
LAYERS = 3  # the MLP's dense layers: hidden0/dense, hidden1/dense, head/dense


pytestmark = pytest.mark.usefixtures("mock_tfds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{input kind: (config, path, summary of the run or None)}: a tiny dense and SD run of the MLP."""
    root = tmp_path_factory.mktemp("runs")
    dense_config, sd_config = tiny_config(), tiny_config(model__sd=True, sd__threshold=4e-3)
    dense = trainer.train_and_evaluate(dense_config, str(root / "dense"))
    sd = trainer.train_and_evaluate(sd_config, str(root / "sd"))
    dense_orbax, sd_orbax = str(root / "dense" / "checkpoints"), str(root / "sd" / "checkpoints")
    dense_npz, decomposed_npz = str(root / "dense.npz"), str(root / "decomposed.npz")
    np.savez(dense_npz, **sd_io.flatten(sd_io.load_params(dense_orbax)))
    commands.decompose(dense_config, dense_orbax, decomposed_npz)
    return {"dense_npz": (dense_config, dense_npz, dense), "dense_orbax": (dense_config, dense_orbax, dense),
            "sd_orbax": (sd_config, sd_orbax, sd), "decomposed_npz": (dense_config, decomposed_npz, None)}


def _sd_variables(path):
    variables = inputs.read_variables(path)
    return variables if inputs.is_sd(variables) else None


@pytest.mark.slow  # two tiny training runs and a decomposition: about 30 s on 2 busy cores
@pytest.mark.parametrize("kind", KINDS)
def test_decompose(runs, kind, tmp_path):
    """A training config decomposes (it ended in KeyError 'max_kernel_size'); the output is the SD model's
    variables in the layers' layout, applied as they are; SD inputs are refused by name."""
    config, path, _ = runs[kind]
    if kind in ("sd_orbax", "decomposed_npz"):
        with pytest.raises(ValueError, match="holds SD variables already"):
            commands.decompose(config, path)
        return
    output = str(tmp_path / "sd.npz")
    report = json.loads(commands.decompose(config, path, output, as_json=True))
    layers = sorted(r["name"].removesuffix("/kernel") for r in report["layers"])
    with np.load(output) as data:
        assert sorted(k for k in data.files if k.startswith("sd_coeff/")) == [f"sd_coeff/{n}/coeff" for n in layers]
    target = inputs.target_of(config)
    model = target.build(SDRules.from_config(config))
    variables = inputs.arranged(inputs.read_variables(output), model, target, output)
    assert model.apply(variables, target.sample(), train=False).shape == (1, 10)


@pytest.mark.slow
def test_decompose_for_a_compression_target_writes_the_allocation_beside_the_output(runs, tmp_path):
    config, path, _ = runs["dense_npz"]
    config = config.copy_and_resolve_references()
    config.sd.target_compression = 6.0
    output = str(tmp_path / "sd.npz")
    report = json.loads(commands.decompose(config, path, output, as_json=True))
    assert report["total"]["compression"] == pytest.approx(6.0, rel=0.05)
    rules = allocate.read_rules(allocate.allocation_path(output))
    assert sorted(pattern for pattern, _ in rules) == sorted(f"^{r['name'].removesuffix('/kernel')}$"
                                                            for r in report["layers"])
    packed = str(tmp_path / "model.sdpack")  # an export for the target describes the allocated rules
    commands.export(config, path, packed)
    described = serve.load(packed).description.sd["rules"]
    assert {pattern for pattern, _ in rules} <= {pattern for pattern, _ in described}
    with pytest.raises(ValueError, match="not in training"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_analyze(runs, kind):
    """A training config analyzes every input kind (dense inputs failed on its unknown `sd` options)."""
    config, path, summary = runs[kind]
    result = json.loads(commands.analyze(config, path, output_format="json"))["summary"]
    assert result["sd_layers"] == LAYERS and result["storage_ratio"] > 1
    if kind == "sd_orbax":  # the trained coefficients, counted as the trainer counts them
        assert result["sd_density"] == pytest.approx(summary["density"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export(runs, kind, tmp_path):
    """SD inputs are packed as they are (an SD Orbax run was decomposed again as if dense)."""
    config, path, _ = runs[kind]
    output = str(tmp_path / "model.sdpack")
    assert "analyzer storage count" in commands.export(config, path, output)
    tensors = packing.load(output)
    sd_tensors = {name: t for name, t in tensors.items() if isinstance(t, packing.SDTensor)}
    assert len(sd_tensors) == LAYERS
    variables = _sd_variables(path)
    if variables is not None:
        for key, basis in sd_io.flatten(variables["sd_basis"]).items():
            np.testing.assert_array_equal(sd_tensors[f"params/{key.removesuffix('/basis')}/kernel"].basis, basis)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_evaluate(runs, kind):
    config, path, summary = runs[kind]
    result = commands.evaluate(config, path)
    assert 0 <= result["accuracy"] <= 1 and np.isfinite(result["loss"])
    if summary is not None:  # the final checkpoint of the run is the model it reported
        assert result["accuracy"] == pytest.approx(summary["accuracy"])
        assert result["loss"] == pytest.approx(summary["loss"], rel=1e-5)


@pytest.mark.slow
def test_every_mode_reads_an_adaptation_run_with_its_config(tmp_path):
    """The adaptation target part has 5 classes; the config alone builds the matching model (it needed
    a hand-matched model)."""
    config = tiny_config(model__sd=True, input__setting="adaptation", input__part="target")
    run = str(tmp_path / "run")
    summary = trainer.train_and_evaluate(config, run)
    path = os.path.join(run, "checkpoints")
    assert inputs.target_of(config).num_classes == 5
    analyzed = json.loads(commands.analyze(config, path, output_format="json"))["summary"]
    assert analyzed["sd_density"] == pytest.approx(summary["density"])
    assert commands.evaluate(config, path)["accuracy"] == pytest.approx(summary["accuracy"])
    commands.export(config, path, str(tmp_path / "x.sdpack"))
    assert packing.load(str(tmp_path / "x.sdpack"))["params/head/dense/kernel"].spec.num_outputs == 5
    with pytest.raises(sd_io.CheckpointError, match="10 classes"):
        commands.evaluate(tiny_config(model__sd=True), path)


@pytest.mark.slow  # decomposes the MLP: about 9 s
def test_analyze_with_a_training_config_and_no_checkpoint():
    """He-normal weights decomposed by the config's `sd` rules (a training config's `sd` options were unknown)."""
    summary = json.loads(commands.analyze(tiny_config(), output_format="json"))["summary"]
    assert summary["sd_layers"] == LAYERS and summary["storage_ratio"] > 1


def test_a_model_without_input_geometry_takes_its_zoo_input():
    config = tiny_config()
    assert inputs.target_of(config).input_shape == (1, 28, 28, 1)
    assert inputs.target_of(config, "resnet50_imagenet").num_classes == 1000
    with pytest.raises(ValueError, match="--model=NAME"):
        inputs.target_of(None)
    with pytest.raises(ValueError, match="needs a config that describes a run"):
        commands.evaluate(None, "x.npz")
