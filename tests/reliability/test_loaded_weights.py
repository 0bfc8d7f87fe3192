"""Loaded weights are checked before use (issue 13, item 1): a non-finite weight is refused with its
layer, count and file by the trainer's `init.from_params` and by every command; a checkpoint whose
shapes do not fit the model a command builds is refused, also when it holds layers the model lacks."""

import jax
import ml_dtypes
import numpy as np
import pytest

from sd_jax import commands
from sd_jax import io as sd_io
from sd_jax.commands import inputs
from sd_jax.train import trainer
from tests.train.tiny_config import tiny_config

BAD_LEAF = "params/hidden2/dense/kernel"
HIDDEN = (32, 16)  # a small MLP: fast to build, decompose and evaluate


def _config(hidden=HIDDEN):
    config = tiny_config()
    config.model.options.hidden = hidden
    return config


def _save(path, config, poison=None):
    """The initial variables of `config`'s model as an .npz; `poison` values of BAD_LEAF made NaN."""
    target = inputs.target_of(config)
    flat = sd_io.flatten(target.build().init(jax.random.key(0), target.sample(), train=False))
    if poison:
        flat[BAD_LEAF] = flat[BAD_LEAF].copy()
        flat[BAD_LEAF].reshape(-1)[:poison] = np.nan
    np.savez(path, **flat)
    return str(path)


pytestmark = pytest.mark.usefixtures("mock_tfds")


@pytest.fixture(scope="module")
def nan_npz(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("weights") / "nan.npz", _config(), poison=3)


def test_check_finite_names_the_first_bad_leaf_its_count_and_the_file():
    tree = {"params": {"a": {"kernel": np.ones((2, 2), np.float32)},
                       "b": {"kernel": np.array([1.0, np.inf, np.nan], ml_dtypes.bfloat16)},
                       "c": {"bias": np.array([np.nan], np.float32)}},
            "steps": np.array([1, 2], np.int32)}
    with pytest.raises(sd_io.CheckpointError, match=r"run\.npz: params/b/kernel holds 2 non-finite values "
                                                    r"\(NaN or inf\) \(and 1 more arrays\); .*retrain"):
        sd_io.check_finite(tree, "run.npz")


def test_check_finite_returns_a_finite_tree_as_it_is():
    tree = {"params": {"kernel": np.ones(3, np.float32)}, "mask": np.array([True, False]),
            "step": np.int32(4)}
    assert sd_io.check_finite(tree, "run.npz") is tree


@pytest.mark.parametrize("command", ["decompose", "analyze", "export", "evaluate"])
def test_every_command_refuses_a_non_finite_weight(command, nan_npz, tmp_path):
    """decompose, analyze and export wrote results for NaN weights without a word."""
    call = {"decompose": lambda: commands.decompose(_config(), nan_npz, str(tmp_path / "sd.npz")),
            "analyze": lambda: commands.analyze(_config(), nan_npz),
            "export": lambda: commands.export(_config(), nan_npz, str(tmp_path / "model.sdpack")),
            "evaluate": lambda: commands.evaluate(_config(), nan_npz)}[command]
    with pytest.raises(sd_io.CheckpointError, match=f"{nan_npz}: {BAD_LEAF} holds 3 non-finite values"):
        call()
    assert not list(tmp_path.iterdir())


def test_training_refuses_non_finite_init_from_params(nan_npz, tmp_path):
    """A NaN weight in init.from_params trained on at chance accuracy with a finite loss."""
    config = _config()
    config.init.from_params = nan_npz
    with pytest.raises(sd_io.CheckpointError, match=f"{BAD_LEAF} holds 3 non-finite values"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("command", ["analyze", "export", "evaluate"])
def test_a_checkpoint_of_a_deeper_model_is_refused(command, tmp_path):
    """Variables with layers the model lacks (a deeper model's) were read as the shallower model's."""
    deeper = _save(tmp_path / "deeper.npz", _config(hidden=(*HIDDEN, 8)))
    call = {"analyze": lambda: commands.analyze(_config(), deeper),
            "export": lambda: commands.export(_config(), deeper, str(tmp_path / "model.sdpack")),
            "evaluate": lambda: commands.evaluate(_config(), deeper)}[command]
    with pytest.raises(sd_io.CheckpointError, match=r"do not fit model 'mlp'.*not in the model \[\"\['params'\]"
                                                    r"\['hidden3'\]"):
        call()
    assert not (tmp_path / "model.sdpack").exists()


@pytest.mark.slow  # builds two ResNets and analyzes one: about 15 s on 2 busy cores
@pytest.mark.parametrize("saved, read", [("resnet32", "resnet20"), ("resnet20", "resnet32")])
def test_analyze_and_export_refuse_a_resnet_checkpoint_for_another_depth(saved, read, tmp_path):
    """The issue's case: `--model` naming another ResNet depth than the checkpoint's wrote a report."""
    target = inputs.target_of(None, saved)
    path = str(tmp_path / f"{saved}.npz")
    sd_io.save_variables(path, target.build().init(jax.random.key(0), target.sample(), train=False))
    for call in (lambda: commands.analyze(None, path, model_name=read),
                 lambda: commands.export(None, path, str(tmp_path / "x.sdpack"), model_name=read)):
        with pytest.raises(sd_io.CheckpointError, match=f"do not fit model '{read}'"):
            call()
    assert not (tmp_path / "x.sdpack").exists()
