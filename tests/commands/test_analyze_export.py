"""Tests for --mode=analyze and --mode=export (sd_jax/commands and launch/main.py)."""
import json
import os
import subprocess
import sys

import flax
import numpy as np
import pytest

from experiments.configs import default
from sd_jax import commands
from sd_jax.commands import inputs
from sd_jax.core import packing
from sd_jax.cost import comparison
from sd_jax.models.synthetic import he_normal_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def lenet_params(tmp_path_factory):
    target = inputs.target_of(None, "lenet5")
    params = he_normal_params(target.build(), target.input_shape)
    path = tmp_path_factory.mktemp("ckpt") / "lenet.npz"
    np.savez(path, **{"/".join(k): v for k, v in _flat(params).items()})
    return str(path)


def _flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
    return out


@pytest.mark.slow  # decomposes LeNet-5: about 20-40 s on 2 busy cores
def test_analyze_reports_dense_and_sd_in_every_format(lenet_params, tmp_path):
    config = default.get_config()
    data = json.loads(commands.analyze(config, model_name="lenet5", output_format="json", plots_dir=str(tmp_path)))
    from_npz = json.loads(commands.analyze(config, lenet_params, model_name="lenet5", output_format="json"))
    assert from_npz["summary"]["sd_layers"] == 5  # the '/'-named zoo layers of an .npz are found
    assert data["summary"]["storage_ratio"] > 1 and len(data["layers"]) == 5
    text = commands.analyze(config, model_name="lenet5")
    assert "dense 8-bit / SD" in text and "integer-only SD inference per image: " in text
    assert "dense 8-bit / integer" in text
    assert commands.analyze(config, model_name="lenet5", output_format="csv").startswith("layer,kind,kernel,macs")
    assert "| --- |" in commands.analyze(config, model_name="lenet5", output_format="markdown")
    assert sorted(os.listdir(tmp_path)) == ["lenet5_energy.png", "lenet5_storage.png"]


@pytest.mark.slow  # decomposes LeNet-5: about 20-40 s on 2 busy cores
def test_export_of_a_dense_checkpoint_matches_the_storage_count(lenet_params, tmp_path):
    output = str(tmp_path / "lenet.sdpack")
    text = commands.export(default.get_config(), lenet_params, output, model_name="lenet5")
    assert "analyzer storage count" in text
    tensors = packing.load(output)
    assert sum(isinstance(t, packing.SDTensor) for t in tensors.values()) == 5  # two 5x5 convs and three dense kernels


@pytest.mark.slow  # decomposes LeNet-5: about 20-40 s on 2 busy cores
def test_export_keeps_batch_norm_statistics_of_a_training_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    from sd_jax.io import flatten

    target = inputs.target_of(None, "resnet20")
    params = he_normal_params(target.build(), target.input_shape)
    stats = {"stem/bn": {"mean": np.full(16, 0.5, np.float32), "var": np.full(16, 2.0, np.float32)}}
    manager = ocp.CheckpointManager(str(tmp_path / "run"))
    manager.save(1, args=ocp.args.StandardSave({"params": params, "batch_stats": stats}))
    manager.wait_until_finished()
    output = str(tmp_path / "resnet20.sdpack")
    commands.export(default.get_config(), str(tmp_path / "run"), output, model_name="resnet20")
    tensors = packing.load(output)
    np.testing.assert_array_equal(tensors["batch_stats/stem/bn/var"], flatten(stats)["stem/bn/var"])


@pytest.mark.slow  # decomposes LeNet-5: about 20-40 s on 2 busy cores
def test_export_of_an_sd_checkpoint(lenet_params, tmp_path):
    config = default.get_config()
    sd_path = str(tmp_path / "sd.npz")
    config.model.name = "lenet5"
    config.input.dataset = "cifar10"
    commands.decompose(config, lenet_params, sd_path, as_json=True)
    output = str(tmp_path / "lenet.sdpack")
    commands.export(config, sd_path, output)
    tensors = packing.load(output)
    data = np.load(sd_path)
    basis = data["sd_basis/classifier/fc1/basis"]
    np.testing.assert_array_equal(tensors["params/classifier/fc1/kernel"].basis, basis)


def test_unknown_cost_key_raises():
    config = default.get_config()
    config.cost = dict(flux=1)
    with pytest.raises(ValueError, match="unknown key"):
        comparison.cost_options(config)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


@pytest.mark.slow
def test_cli_analyze_and_export(lenet_params, tmp_path):
    analyzed = _cli("--mode=analyze", "--model=lenet5", "--format=markdown")
    assert analyzed.returncode == 0, analyzed.stderr
    assert "dense / SD" in analyzed.stdout
    written = _cli("--mode=analyze", "--model=lenet5", "--json", f"--output={tmp_path / 'energy.json'}")
    assert written.returncode == 0 and written.stdout == "", written.stderr
    summary = json.loads((tmp_path / "energy.json").read_text())["summary"]
    assert summary["inference_energy_ratio"] > summary["inference_energy_ratio_vs_int8"] > 0
    exported = _cli("--mode=export", "--model=lenet5", f"--params={lenet_params}", f"--output={tmp_path / 'x.sdpack'}")
    assert exported.returncode == 0 and "payload" in exported.stdout
    missing = _cli("--mode=export", "--model=lenet5")
    assert missing.returncode != 0 and "--params" in missing.stderr
    unknown = _cli("--mode=analyze", "--model=nonet")
    assert unknown.returncode == 2 and "unknown model" in unknown.stderr


@pytest.mark.parametrize("mode", ["pow2", "latent"])
def test_analyze_counts_the_trained_sd_variables_of_a_run(tmp_path, mode):
    import tensorflow_datasets as tfds

    from sd_jax import io as sd_io
    from sd_jax.train import trainer
    from tests.train.tiny_config import tiny_config

    update = "bucket_switch" if mode == "pow2" else "latent"
    config = tiny_config(model__sd=True, sd__mode=mode, optim__coeff_update=update)
    run = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=64):
        summary = trainer.train_and_evaluate(config, run)
    text = commands.analyze(config, os.path.join(run, "checkpoints"), output_format="json")
    analyzed = json.loads(text)["summary"]
    # the trainer's summary and the analyzer count the same coefficients the same way
    assert summary["compression_ratio"] == pytest.approx(analyzed["storage_ratio"])
    assert summary["density"] == pytest.approx(analyzed["sd_density"])
    # the integer path: every effective MAC in int8, priced by the default (Horowitz) table
    assert analyzed["integer_int8_macs"] == analyzed["effective_macs"] and analyzed["integer_rebuild_adds"] > 0
    assert analyzed["integer_inference_energy"] > 0 and analyzed["integer_unpriced"] == []
    if mode == "pow2":  # stored coefficients are the used ones: count them by hand
        rows = {row["layer"]: row for row in json.loads(text)["layers"]}
        variables = sd_io.load_variables(os.path.join(run, "checkpoints"))
        masks = flax.traverse_util.flatten_dict(variables["sd_mask"], sep="/")
        for path, coeff in flax.traverse_util.flatten_dict(variables["sd_coeff"], sep="/").items():
            name = path.removesuffix("/coeff")
            kept = np.asarray(coeff)[np.asarray(masks[f"{name}/mask"])]
            assert rows[name]["density"] == pytest.approx(np.count_nonzero(kept) / coeff.size)
    # counted at the run's float32 numerics unless a cost section asks for the 8-bit SD hardware
    config.cost = dict(comparison.COST_DEFAULTS)
    at_8_bits = json.loads(commands.analyze(config, os.path.join(run, "checkpoints"), output_format="json"))["summary"]
    assert 1 < analyzed["inference_energy_ratio"] < at_8_bits["inference_energy_ratio"]
    # the dense 8-bit baseline does not depend on the SD side's numerics; an 8-bit SD side beats a float32 one
    assert at_8_bits["dense_int8_inference_energy"] == pytest.approx(analyzed["dense_int8_inference_energy"])
    assert analyzed["inference_energy_ratio_vs_int8"] < at_8_bits["inference_energy_ratio_vs_int8"]
