"""Tests for sd_jax/serve/exported.py: a jax.export artifact of a served model runs in a process that has
only jax and numpy, and gives the served logits."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from sd_jax import models, serve
from sd_jax.models.resnet_cifar import CifarResNet
from sd_jax.nn.rules import SDRules
from tests.serve.test_packed import MLP_INPUT, _trained_like

# Runs the artifact with jax and numpy alone: importing sd_jax would raise ImportError.
RUNNER = """
import json, sys
sys.modules["sd_jax"] = None
import jax, numpy as np
path, images, output = sys.argv[1:]
sidecar = json.load(open(path + ".json"))
exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
np.save(output, np.asarray(exported.call(np.load(images).astype(sidecar["input_dtype"]))))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = models.get("mlp", num_classes=10, sd=True)
    path = str(tmp_path_factory.mktemp("served") / "mlp.sdpack")
    serve.save(path, model, _trained_like(model, MLP_INPUT, latent=False), serve.ModelDescription("mlp", 10, MLP_INPUT))
    return serve.load(path)


def _run_alone(path, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run([sys.executable, "-c", RUNNER, path, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "out.npy")


def test_an_exported_model_reloads_with_a_symbolic_batch(served, tmp_path):
    """Not bit for bit: the reloaded program is compiled anew, with the variables as constants."""
    path = str(tmp_path / "mlp.jaxexport")
    exported = serve.export_artifact(served, path)
    sidecar = json.loads(open(path + ".json").read())
    assert sidecar["input_shape"] == [None, 28, 28, 1] and sidecar["path_kind"] == "float"
    assert sidecar["model"]["name"] == "mlp" and sidecar["format"] == "sd_jax.exported"
    reloaded, _ = serve.load_artifact(path)
    assert str(reloaded.in_avals) == str(exported.in_avals) == "(ShapedArray(float32[batch,28,28,1]),)"
    images = np.asarray(jax.random.normal(jax.random.key(3), (3, *MLP_INPUT[1:])))
    np.testing.assert_allclose(reloaded.call(images), served.apply(images), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a second Python process that imports jax: about 8 s on 2 busy cores
def test_an_exported_model_runs_in_a_process_without_sd_jax(served, tmp_path):
    path = str(tmp_path / "mlp.jaxexport")
    serve.export_artifact(served, path)
    images = np.asarray(jax.random.normal(jax.random.key(3), (5, *MLP_INPUT[1:])))
    np.testing.assert_allclose(_run_alone(path, images, tmp_path), np.asarray(served.apply(images)), rtol=1e-5,
                               atol=1e-6)


def test_the_integer_path_exports_with_a_fixed_batch_and_gives_apply_int_bit_for_bit(served, tmp_path):
    """`path_kind='int'` exports what `apply_int` runs: integer arithmetic, then one float scale of the logits
    (the same operations compiled anew), so the reloaded artifact's logits are equal, not close."""
    path = str(tmp_path / "int.jaxexport")
    with pytest.raises(ValueError, match="needs an integer model"):
        serve.export_artifact(served, path, path_kind="int")
    shape = (1, 4, 4, 1)  # a small MLP: quantizing the default one compiles for seconds
    model = models.get("mlp", num_classes=5, sd=True, hidden=(24,))
    serve.save(str(tmp_path / "small.sdpack"), model, _trained_like(model, shape, latent=False),
               serve.ModelDescription("mlp", 5, shape, options=dict(hidden=[24])))
    small = serve.load(str(tmp_path / "small.sdpack"))
    quantized = small.quantized(jax.random.normal(jax.random.key(4), (32, *shape[1:])))
    exported = serve.export_artifact(quantized, path, batch_size=4, path_kind="int")
    assert exported.in_avals[0].shape == (4, 4, 4, 1)
    reloaded, sidecar = serve.load_artifact(path)
    assert sidecar["path_kind"] == "int" and sidecar["input_shape"] == [4, 4, 4, 1]
    images = np.asarray(jax.random.normal(jax.random.key(5), (4, *shape[1:])))
    np.testing.assert_array_equal(reloaded.call(images), quantized.apply_int(images))


@pytest.mark.slow  # quantizing and exporting a ResNet-8 compiles its integer convolutions: about 40 s on 2 busy cores
def test_the_integer_path_of_a_resnet_exports_bit_for_bit(tmp_path):
    """Convolutions, residual adds and pooling in integers: the reloaded artifact (symbolic batch) equals
    `apply_int` at every batch size."""
    rules, shape = SDRules(), (1, 8, 8, 3)
    model = CifarResNet(depth=8, num_classes=4, conv=rules.conv_factory(), dense=rules.dense_factory())
    path = str(tmp_path / "resnet8.sdpack")
    serve.save(path, model, _trained_like(model, shape, latent=False),
               serve.ModelDescription(None, 4, shape, rules.as_section()))
    quantized = serve.load(path, model=model).quantized(jax.random.normal(jax.random.key(4), (32, *shape[1:])))
    serve.export_artifact(quantized, path + ".jaxexport", path_kind="int")
    reloaded, _ = serve.load_artifact(path + ".jaxexport")
    for batch in (1, 5):
        images = np.asarray(jax.random.normal(jax.random.key(batch), (batch, *shape[1:])))
        np.testing.assert_array_equal(reloaded.call(images), quantized.apply_int(images))


def test_a_missing_sidecar_a_damaged_artifact_and_a_newer_version_are_refused(served, tmp_path):
    path = str(tmp_path / "mlp.jaxexport")
    with pytest.raises(ValueError, match="cannot read the artifact"):
        serve.load_artifact(path)
    serve.export_artifact(served, path, batch_size=1)
    data = open(path, "rb").read()
    with open(path, "wb") as stream:
        stream.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="mlp.jaxexport: the serialized function is damaged"):
        serve.load_artifact(path)
    sidecar = json.loads(open(path + ".json").read())
    with open(path + ".json", "w") as stream:
        json.dump(dict(sidecar, version=2), stream)
    with pytest.raises(ValueError, match="artifact version 2 is newer than this reader's 1"):
        serve.load_artifact(path)
