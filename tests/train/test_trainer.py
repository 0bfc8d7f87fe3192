import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sd_jax.train import trainer
from sd_jax.train.checkpoint import CheckpointError
from tests.train.tiny_config import tiny_config


@pytest.fixture(autouse=True)
def _mock():
    with tfds.testing.mock_data(num_examples=64):
        yield


def _config(**changes):
    return tiny_config(**changes)


def test_dense_then_sd_finetune_end_to_end(tmp_path):
    dense_dir = str(tmp_path / "dense")
    summary = trainer.train_and_evaluate(_config(), dense_dir)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["steps"] == 4
    assert os.path.exists(os.path.join(dense_dir, "summary.json"))
    lines = open(os.path.join(dense_dir, "metrics.jsonl")).read().splitlines()
    assert json.loads(lines[-1])["step"] == 4 and any(f.startswith("events") for f in
                                                      os.listdir(os.path.join(dense_dir, "tensorboard")))
    sd_config = _config(init__from_params=os.path.join(dense_dir, "checkpoints"), sd__threshold=4e-3, model__sd=True)
    sd_summary = trainer.train_and_evaluate(sd_config, str(tmp_path / "sd"))
    assert sd_summary["compression_ratio"] > 1 and 0 < sd_summary["density"] <= 1
    evaluated = trainer.evaluate(sd_config, str(tmp_path / "sd"))
    assert evaluated["accuracy"] == pytest.approx(sd_summary["accuracy"])


def test_interrupted_run_resumes_bitwise(tmp_path, monkeypatch):
    import jax

    from sd_jax.train.checkpoint import load_variables

    config = _config(optim__epochs=2, ckpt__every_steps=3)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    original, calls = trainer._global_batch, []

    def interrupt_after_five(batch, mesh):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt("simulated preemption")
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "_global_batch", interrupt_after_five)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(trainer, "_global_batch", original)
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["loss"] == full["loss"] and resumed["accuracy"] == full["accuracy"]
    jax.tree.map(np.testing.assert_array_equal, load_variables(str(tmp_path / "full" / "checkpoints")),
                 load_variables(str(tmp_path / "resumed" / "checkpoints")))


def test_evaluate_without_checkpoint_and_finetune_from_another_model(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer.evaluate(_config(), str(tmp_path / "empty"))
    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(), dense_dir)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        trainer.train_and_evaluate(_config(model__name="lenet5", init__from_params=os.path.join(dense_dir, "checkpoints")),
                                   str(tmp_path / "other"))


def test_finetune_from_an_npz_of_dense_zoo_params(tmp_path):
    from sd_jax.train.checkpoint import atomic_savez, flatten, load_variables

    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(), dense_dir)
    params = load_variables(os.path.join(dense_dir, "checkpoints"))["params"]
    assert any("/" in layer for layer in params)  # zoo names: the npz nests them one level deeper
    npz = str(tmp_path / "dense.npz")
    atomic_savez(npz, {f"params/{key}": value for key, value in flatten(params).items()})
    summary = trainer.train_and_evaluate(_config(model__sd=True, init__from_params=npz), str(tmp_path / "sd"))
    assert summary["sd"] and 0 < summary["density"] <= 1


@pytest.mark.slow
def test_adaptation_resets_the_classifier(tmp_path):
    import numpy as np

    from sd_jax.train.checkpoint import load_variables

    source = _config(input__setting="adaptation", input__part="source")
    trainer.train_and_evaluate(source, str(tmp_path / "source"))
    target = _config(input__setting="adaptation", input__part="target", init__reset="^head/",
                     init__from_params=str(tmp_path / "source" / "checkpoints"), optim__lr=1e-9)
    trainer.train_and_evaluate(target, str(tmp_path / "target"))
    before = load_variables(str(tmp_path / "source" / "checkpoints"))["params"]
    after = load_variables(str(tmp_path / "target" / "checkpoints"))["params"]
    hidden = [name for name in before if not name.startswith("head/")][0]
    np.testing.assert_allclose(before[hidden]["kernel"], after[hidden]["kernel"], atol=1e-6)  # kept
    assert not np.allclose(before["head/dense"]["kernel"], after["head/dense"]["kernel"], atol=1e-3)  # reset


@pytest.mark.slow
def test_swa_ends_in_sd_form_with_recomputed_batch_norm(tmp_path):
    import jax
    import numpy as np

    from sd_jax.train.checkpoint import load_variables

    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(model__name="lenet5"), dense_dir)
    config = _config(model__name="lenet5", model__sd=True, init__from_params=os.path.join(dense_dir, "checkpoints"),
                     swa__start_fraction=0.5, swa__bn_batches=2, optim__epochs=2)
    summary = trainer.train_and_evaluate(config, str(tmp_path / "swa"))
    assert 0 <= summary["accuracy"] <= 1
    coeffs = load_variables(str(tmp_path / "swa" / "checkpoints"))["sd_coeff"]
    for leaf in jax.tree.leaves(coeffs):
        mantissa, _ = np.frexp(np.asarray(leaf, np.float64))
        assert ((np.asarray(leaf) == 0) | (np.abs(mantissa) == 0.5)).all()


def test_sd_from_scratch_with_8_bit_activations_and_gradients(tmp_path):
    summary = trainer.train_and_evaluate(
        _config(model__sd=True, sd__activation_bits=8, sd__gradient_bits=8, optim__switch_bar=4), str(tmp_path))
    assert 0 <= summary["accuracy"] <= 1 and summary["sd"] is True
    assert summary["compression_ratio"] > 1


def test_latent_update_of_stored_power_of_two_coefficients_is_refused(tmp_path):
    config = tiny_config(model__sd=True, optim__coeff_update="latent", sd__mode="pow2")
    with pytest.raises(ValueError, match="sd.mode='latent'"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
