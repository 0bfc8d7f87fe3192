"""Tests for sd_jax/serve/packed.py: train = serve, bit for bit, for zoo models and a user's own model, and
packed files that are refused with a message naming what is wrong."""
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import default
from sd_jax import commands, models, serve
from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.core import packing
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SDRules, swap_layers, to_sd
from sd_jax.serve import integer
from sd_jax.train import trainer
from tests.core.test_packing import version_1
from tests.train.tiny_config import tiny_config

MLP_INPUT = (1, 28, 28, 1)


def _trained_like(model, shape, *, latent=True, seed=0):
    """Variables of `model` as training leaves them: C latent floats (`latent`, for 'latent'-mode layers) or
    moved by powers of two ('pow2' mode), a quarter of them far below the threshold inside the mask, and
    batch-norm statistics away from their initial values (seeded stand-ins: the initialisers take seconds)."""
    variables = synthetic_variables(model, jnp.zeros(shape), seed)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        collection = path[0].key
        if collection == "sd_coeff":
            factor = rng.uniform(0.7, 1.4, leaf.shape) if latent else np.exp2(rng.integers(-1, 2, leaf.shape))
            return (leaf * np.where(rng.random(leaf.shape) < 0.25, 2.0**-14, factor)).astype(np.float32)
        if collection == "batch_stats":
            return leaf + rng.uniform(0.1, 0.5, leaf.shape).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, dict(variables))


def _logits(model, variables, images, **kwargs):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, images))


def test_served_mlp_gives_the_trained_logits_bit_for_bit(tmp_path):
    rules = SDRules(threshold=4e-3)
    model = models.get("mlp", num_classes=10, sd=rules)
    variables = _trained_like(model, MLP_INPUT)
    path = str(tmp_path / "mlp.sdpack")
    serve.save(path, model, variables, serve.ModelDescription("mlp", 10, MLP_INPUT, rules.as_section()))
    images = jax.random.normal(jax.random.key(1), (3, *MLP_INPUT[1:]))
    served = serve.load(path)
    np.testing.assert_array_equal(np.asarray(served.apply(images)), _logits(model, variables, images, train=False))
    assert served.description.name == "mlp" and served.integer_model is None


@pytest.mark.slow  # about 25 s on 2 busy cores: two compilations of ResNet-20
def test_exported_resnet20_gives_the_trained_logits_bit_for_bit(tmp_path):
    """`--mode=export` with a config's own rules ('latent' layers, the classifier kept dense): batch norm and
    3x3 and 1x1 SD convolutions."""
    config = default.get_config()
    config.model.name = "resnet20"
    config.sd.mode, config.sd.threshold, config.sd.rules = "latent", 4e-3, [("^head/dense$", {"skip": True})]
    model = models.get("resnet20", num_classes=10, sd=SDRules.from_config(config))
    variables = _trained_like(model, (1, 32, 32, 3))
    params, output = str(tmp_path / "sd.npz"), str(tmp_path / "resnet20.sdpack")
    np.savez(params, **sd_io.flatten(variables))
    commands.export(config, params, output)
    served = serve.load(output)
    assert "kernel" in served.variables["params"]["head"]["dense"]
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(served.apply(images)), _logits(model, variables, images, train=False))


class UserNet(nn.Module):
    """A plain Flax model of a user: nn.Conv / nn.Dense called directly, a nested module, no `train`."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="depthwise")(x)
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


def _user_variables(model, shape):
    """Seeded variables of a user's model whose 'latent' and 'pow2' layers alike hold ±2^e coefficients, with
    masks that drop some of them (its initialisers would take seconds)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[0].key == "sd_coeff":
            return np.exp2(-rng.integers(0, 4, leaf.shape)) * rng.choice([-1, 1], leaf.shape).astype(np.float32)
        if path[0].key == "sd_mask":
            return rng.random(leaf.shape) < 0.8
        return rng.normal(0, 0.3, leaf.shape).astype(np.float32)

    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return jax.tree_util.tree_map_with_path(fill, dict(abstract))


def test_a_users_swapped_model_is_served_with_the_model_given(tmp_path):
    model = swap_layers(UserNet(), SDRules([("^Dense_0$", {"mode": "pow2"})], threshold=0.05))
    shape = (1, 8, 8, 3)
    variables = _user_variables(model, shape)
    description = serve.ModelDescription(None, 5, shape, apply_kwargs={})
    path = str(tmp_path / "user.sdpack")
    serve.save(path, model, variables, description)
    with pytest.raises(ValueError, match="user's own model.*model=swap_layers"):
        serve.load(path)
    images = jax.random.normal(jax.random.key(1), (2, *shape[1:]))
    served = serve.load(path, model=model)
    np.testing.assert_array_equal(np.asarray(served.apply(images)), _logits(model, variables, images))
    with pytest.raises(sd_io.CheckpointError, match="do not fit the model"):
        serve.load(path, model=swap_layers(UserNet(), SDRules(threshold=0.05, row_length=2)))


def test_export_of_sd_variables_then_load_gives_their_logits(tmp_path):
    """`--mode=export` of an SD model's variables (.npz, as --mode=decompose writes them), then `serve.load`;
    the config's layers are in 'pow2' mode (C as stored, the bucket switch's)."""
    config = tiny_config(model__sd=True, sd__threshold=4e-3)
    model = models.get("mlp", num_classes=10, sd=SDRules.from_config(config))
    variables = _trained_like(model, MLP_INPUT, latent=False)
    params = str(tmp_path / "sd.npz")
    np.savez(params, **sd_io.flatten(variables))
    output = str(tmp_path / "mlp.sdpack")
    assert "analyzer storage count" in commands.export(config, params, output)
    served = serve.load(output)
    assert served.description.input_shape == MLP_INPUT and served.description.rules().defaults["threshold"] == 4e-3
    images = jax.random.normal(jax.random.key(2), (4, *MLP_INPUT[1:]))
    np.testing.assert_array_equal(np.asarray(served.apply(images)), _logits(model, variables, images, train=False))


def test_export_writes_the_integer_model_calibrated_on_the_first_training_images(tmp_path):
    """`--mode=export` with `integer_calibration`: mlp.int.npz beside mlp.sdpack holds the integer form of the
    packed model calibrated on the config's first training images, as `served.quantized` makes it."""
    config = tiny_config(model__sd=True)
    config.model.options.hidden = (24,)  # a small MLP: quantizing the default one compiles for seconds
    model = models.get("mlp", num_classes=10, sd=SDRules.from_config(config), hidden=(24,))
    params, output = str(tmp_path / "sd.npz"), str(tmp_path / "mlp.sdpack")
    np.savez(params, **sd_io.flatten(_trained_like(model, MLP_INPUT, latent=False)))
    with tfds.testing.mock_data(num_examples=32):
        with pytest.raises(ValueError, match="integer_calibration=-1 must be a number of training images"):
            commands.export(config, params, output, integer_calibration=-1)
        report = commands.export(config, params, output, integer_calibration=16)
        calibration = inputs.calibration_images(config, 16)
    assert f"wrote {tmp_path / 'mlp.int.npz'}: the integer-only model, calibrated on 16 training images" in report
    served = serve.load(output)
    written = served.with_integer_model(integer.load(tmp_path / "mlp.int.npz"))
    images = jax.random.normal(jax.random.key(6), (8, *MLP_INPUT[1:]))
    np.testing.assert_array_equal(written.apply_int(images), served.quantized(calibration).apply_int(images))


@pytest.fixture(scope="module")
def packed_mlp(tmp_path_factory):
    """(path, bytes) of a packed MLP."""
    model = models.get("mlp", num_classes=10, sd=True)
    path = str(tmp_path_factory.mktemp("packed") / "mlp.sdpack")
    serve.save(path, model, _trained_like(model, MLP_INPUT), serve.ModelDescription("mlp", 10, MLP_INPUT))
    with open(path, "rb") as stream:
        return path, stream.read()


def test_a_version_1_file_is_served_with_its_model_or_refused_with_the_fix(packed_mlp, tmp_path):
    path, data = packed_mlp
    old = tmp_path / "old.sdpack"
    old.write_bytes(version_1(data))
    with pytest.raises(packing.PackingError, match=r"old.sdpack: format version 1 without a model description; "
                                                   r"export it again with --mode=export"):
        serve.load(str(old))
    model = models.get("mlp", num_classes=10, sd=True)
    images = jnp.ones((2, *MLP_INPUT[1:]))
    served = serve.load(str(old), model=model, input_shape=MLP_INPUT)
    np.testing.assert_array_equal(np.asarray(served.apply(images)), np.asarray(serve.load(path).apply(images)))


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-100], "bytes, but the header describes"),
    (lambda data: data[:-50] + bytes([data[-50] ^ 0x10]) + data[-49:], "checksum mismatch"),
    (lambda data: b"PK\3\4" + data[4:], "not an SD packed file"),
    (lambda data: data[:8] + struct.pack("<I", 3) + data[12:],
     "format version 3 is newer than this reader's version 2"),
])
def test_damaged_or_newer_files_are_refused_naming_the_file(packed_mlp, tmp_path, damage, message):
    _, data = packed_mlp
    bad = tmp_path / "bad.sdpack"
    bad.write_bytes(damage(data))
    with pytest.raises(packing.PackingError, match=f"bad.sdpack: .*{message}"):
        serve.load(str(bad))


def test_images_that_do_not_fit_and_a_missing_integer_model_are_refused(packed_mlp):
    served = serve.load(packed_mlp[0])
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\) do not fit the model's input \(batch, 28, 28, 1\)"):
        served.apply(jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="pass them as floats"):
        served.apply(jnp.zeros((2, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match="no integer model.*quantized"):
        served.apply_int(jnp.zeros((2, 28, 28, 1)))


def test_quantized_served_model_runs_integer_only_close_to_the_float_path(packed_mlp):
    images = jax.random.normal(jax.random.key(7), (64, 28, 28, 1))
    served = serve.load(packed_mlp[0]).quantized(images)
    floats, integers = served.apply(images[:16]), served.apply_int(images[:16])
    assert integers.dtype == jnp.float32 and integers.shape == floats.shape
    spread = float(jnp.max(floats) - jnp.min(floats))
    assert float(jnp.max(jnp.abs(integers - floats))) < 0.1 * spread


@pytest.mark.slow  # two tiny training runs and two decompositions of the MLP: about 60 s on 2 busy cores
def test_training_checkpoints_exported_then_served_give_the_trained_logits(tmp_path):
    """`--mode=export` of an SD training checkpoint, and of a dense one (decomposed by the export), then
    `serve.load`: the logits of the SD model the checkpoint holds, or that `to_sd` makes of the dense one."""
    images = jax.random.normal(jax.random.key(4), (4, *MLP_INPUT[1:]))
    with tfds.testing.mock_data(num_examples=64):
        for config in (tiny_config(model__sd=True, sd__threshold=4e-3), tiny_config()):
            run = tmp_path / ("sd" if config.model.sd else "dense")
            trainer.train_and_evaluate(config, str(run))
            checkpoint, output = str(run / "checkpoints"), str(run / "model.sdpack")
            commands.export(config, checkpoint, output)
            target, rules = inputs.target_of(config), SDRules.from_config(config)
            model = target.build(rules)
            if config.model.sd:
                variables = inputs.arranged(inputs.read_variables(checkpoint), model, target, checkpoint)
            else:
                variables, _ = to_sd({"params": inputs.dense_params(target, checkpoint)}, rules)
            np.testing.assert_array_equal(np.asarray(serve.load(output).apply(images)),
                                          _logits(model, variables, images, train=False))
