"""Bad runs end with a clear message and an intact workdir (sd_jax/train/trainer.py, launch/main.py).

A non-finite loss stops training with `TrainingError` naming the step and the last good checkpoint,
which stays in the workdir and restores; a missing dataset stops `launch.main --mode=train` with exit
status 2 and the command that prepares it, without a traceback.
"""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sd_jax.data import builders
from sd_jax.train import trainer
from sd_jax.io import load_variables
from sd_jax.train.train_checkpoint import TrainCheckpoints
from tests.train.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def _mock():
    with tfds.testing.mock_data(num_examples=64):  # mnist: 64 images, batch 16, 4 steps per epoch
        yield


def _config(**changes):
    return tiny_config(**dict(dict(optim__epochs=2, ckpt__keep_last=10), **changes))  # every loss is checked


def _steps(workdir):
    return TrainCheckpoints(os.path.join(workdir, "checkpoints"), every_steps=1).all_steps()


def _all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.floating))


def _logged(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]


@pytest.mark.slow
def test_nan_loss_stops_names_step_and_checkpoint_and_the_checkpoint_resumes(tmp_path, monkeypatch):
    config = _config()
    clean = trainer.train_and_evaluate(config, str(tmp_path / "clean"))
    workdir = str(tmp_path / "run")
    original, calls = trainer._global_batch, []

    # The loss of step 5 is NaN. The trainer cannot tell bad data from a bad state, so it also drops the
    # checkpoint of step 4 (the state that loss was computed from; saved by the evaluation after epoch 1)
    # and names step 2.
    def nan_images_from_step_5(batch, mesh):
        if "mask" not in batch:  # a training batch (evaluation batches carry a mask)
            calls.append(1)
            if len(calls) >= 5:
                batch = dict(batch, image=np.full(np.shape(batch["image"]), np.nan, np.float32))
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "_global_batch", nan_images_from_step_5)
    with pytest.raises(trainer.TrainingError) as stopped:
        trainer.train_and_evaluate(config, workdir)
    message = str(stopped.value)
    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    assert "nan" in message and "step 5" in message and checkpoints in message and "(step 2)" in message
    assert _steps(workdir) == [2]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    logged = _logged(workdir)
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 4] and "eval_accuracy" in logged[-1]
    assert all(math.isfinite(value) for entry in logged for value in entry.values())
    assert _all_finite(load_variables(checkpoints))

    monkeypatch.setattr(trainer, "_global_batch", original)  # the data are fine again: resume at step 2
    resumed = trainer.train_and_evaluate(config, workdir)
    assert resumed["loss"] == clean["loss"] and resumed["accuracy"] == clean["accuracy"]
    jax.tree.map(np.testing.assert_array_equal, load_variables(str(tmp_path / "clean" / "checkpoints")),
                 load_variables(checkpoints))


def test_nonfinite_evaluation_stops_before_saving_that_state(tmp_path, monkeypatch):
    original = trainer._global_batch

    def nan_evaluation_images(batch, mesh):
        if "mask" in batch:
            batch = dict(batch, image=np.full(np.shape(batch["image"]), np.nan, np.float32))
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "_global_batch", nan_evaluation_images)
    with pytest.raises(trainer.TrainingError, match=r"eval loss is nan after step 4.*\(step 2\)"):
        trainer.train_and_evaluate(_config(), str(tmp_path))  # evaluation after step 4
    assert _steps(str(tmp_path)) == [2]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run whose learning rate (1e20) makes the loss non-finite within a few steps; checkpoints every step."""
    workdir = str(tmp_path_factory.mktemp("diverged"))
    config = _config(optim__lr=1e20, ckpt__every_steps=1)
    with pytest.raises(trainer.TrainingError) as stopped:
        trainer.train_and_evaluate(config, workdir)
    return config, workdir, str(stopped.value)


@pytest.mark.slow
def test_diverging_run_names_the_step_and_keeps_a_finite_checkpoint(diverged):
    _, workdir, message = diverged
    found = re.search(r"loss is (nan|inf|-inf) at step (\d+)", message)
    assert found, message
    step = int(found.group(2))
    kept = _steps(workdir)
    assert step - 1 not in kept  # the state after step - 1 produced the bad loss: dropped
    if kept:
        assert f"(step {kept[-1]})" in message and os.path.join(workdir, "checkpoints") in message
        assert _all_finite(load_variables(os.path.join(workdir, "checkpoints")))
    else:
        assert "no checkpoint was saved" in message


@pytest.mark.slow
def test_the_named_checkpoint_evaluates_to_a_finite_loss(diverged):
    config, workdir, _ = diverged
    if _steps(workdir):
        assert math.isfinite(trainer.evaluate(config, workdir)["loss"])


@pytest.mark.slow
def test_nonfinite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(trainer.TrainingError) as stopped:
        trainer.train_and_evaluate(_config(optim__lr=1e20, ckpt__every_steps=4), str(tmp_path))
    assert "None" not in str(stopped.value)


def test_train_on_a_missing_dataset_exits_2_with_the_prepare_command(tmp_path):
    data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "work")
    ran = subprocess.run(
        [sys.executable, "-m", "launch.main", "--mode=train", "--config=experiments/configs/default.py",
         f"--workdir={workdir}", "--config.input.dataset=cifar10", f"--config.input.data_dir={data_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert ran.returncode == 2, ran.stderr
    assert builders.command("cifar10", data_dir) in ran.stderr and "Traceback" not in ran.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
