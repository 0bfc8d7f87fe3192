import json
import os

import numpy as np
import pytest

from sd_jax.train import trainer
from sd_jax.io import CheckpointError
from sd_jax.train.progress import Progress
from sd_jax.train.workdir import as_path
from tests.train.tiny_config import tiny_config


pytestmark = pytest.mark.usefixtures("mock_tfds")


def _config(**changes):
    return tiny_config(**changes)


def _preempted_then_resumed(config, workdir, monkeypatch, at_call):
    """Run `config` in `workdir` killed at the `at_call`-th batch put on the devices (a simulated
    preemption), then run it again to the end; return the second run's summary."""
    original, calls = trainer._global_batch, []

    def preempt(batch, mesh):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt("simulated preemption")
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "_global_batch", preempt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, workdir)
    monkeypatch.setattr(trainer, "_global_batch", original)
    return trainer.train_and_evaluate(config, workdir)


def _final_state(config, workdir):
    """The train state of the latest checkpoint in `workdir`."""
    run, state = trainer._build(config, as_path(workdir), Progress(enabled=False))
    run.checkpoints.close()
    return state


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


@pytest.mark.parametrize("placement", ["host", "device"])
def test_interrupted_run_resumes_bitwise(tmp_path, monkeypatch, placement):
    import jax

    from sd_jax.io import load_variables

    config = _config(optim__epochs=2, ckpt__every_steps=3, input__placement=placement)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    resumed = _preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch, at_call=6)
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
    from sd_jax.io import atomic_savez, flatten, load_variables

    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(), dense_dir)
    params = load_variables(os.path.join(dense_dir, "checkpoints"))["params"]
    assert set(params["hidden1"]) == {"dense"}  # blocks are modules: slash-joined keys nest back as they were
    npz = str(tmp_path / "dense.npz")
    atomic_savez(npz, {f"params/{key}": value for key, value in flatten(params).items()})
    summary = trainer.train_and_evaluate(_config(model__sd=True, init__from_params=npz), str(tmp_path / "sd"))
    assert summary["sd"] and 0 < summary["density"] <= 1


def test_finetune_from_a_checkpoint_with_the_old_flat_layer_names(tmp_path):
    import orbax.checkpoint as ocp
    from flax import traverse_util

    from sd_jax.io import load_variables

    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(), dense_dir)
    params = load_variables(os.path.join(dense_dir, "checkpoints"))["params"]
    flat = {}  # {'hidden1/dense': {'kernel': ...}}: the layout before blocks were modules
    for (*layer, leaf), value in traverse_util.flatten_dict(params).items():
        flat.setdefault("/".join(layer), {})[leaf] = np.asarray(value)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "flat"), {"params": flat})
    checkpointer.wait_until_finished()
    trainer.train_and_evaluate(_config(init__from_params=str(tmp_path / "flat"), optim__lr=1e-9),
                               str(tmp_path / "finetuned"))
    finetuned = load_variables(str(tmp_path / "finetuned" / "checkpoints"))["params"]
    np.testing.assert_allclose(finetuned["hidden1"]["dense"]["kernel"], flat["hidden1/dense"]["kernel"], atol=1e-6)


@pytest.mark.slow
def test_adaptation_resets_the_classifier(tmp_path):
    import numpy as np

    from sd_jax.io import load_variables

    source = _config(input__setting="adaptation", input__part="source")
    trainer.train_and_evaluate(source, str(tmp_path / "source"))
    target = _config(input__setting="adaptation", input__part="target", init__reset="^head/",
                     init__from_params=str(tmp_path / "source" / "checkpoints"), optim__lr=1e-9)
    trainer.train_and_evaluate(target, str(tmp_path / "target"))
    before = load_variables(str(tmp_path / "source" / "checkpoints"))["params"]
    after = load_variables(str(tmp_path / "target" / "checkpoints"))["params"]
    np.testing.assert_allclose(before["hidden1"]["dense"]["kernel"], after["hidden1"]["dense"]["kernel"],
                               atol=1e-6)  # kept
    assert not np.allclose(before["head"]["dense"]["kernel"], after["head"]["dense"]["kernel"], atol=1e-3)  # reset


@pytest.mark.slow
def test_swa_with_batch_norm_resumes_bitwise(tmp_path, monkeypatch):
    import jax

    from sd_jax.io import load_variables

    config = _config(model__name="resnet20", optim__epochs=3, swa__start_epoch=2, ckpt__every_steps=3,
                     ckpt__keep_last=10)
    config.model.options.depth = 8
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    # Up to step 8: 8 training, 2 x 2 eval, 4 batch-norm (an epoch) and 2 SWA eval batches; call 20 = step 10.
    resumed = _preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch, at_call=20)
    for key in ("accuracy", "loss", "best_accuracy", "best_step", "best_swa_accuracy", "best_swa_step"):
        assert resumed[key] == full[key], key
    final = load_variables(str(tmp_path / "full" / "checkpoints"))
    jax.tree.map(np.testing.assert_array_equal, final, load_variables(str(tmp_path / "resumed" / "checkpoints")))
    trained = load_variables(str(tmp_path / "full" / "checkpoints" / "8" / "state"))  # the trained model at epoch 2
    assert not np.allclose(jax.tree.leaves(final["batch_stats"])[0], jax.tree.leaves(trained["frozen"]["batch_stats"])[0])


def test_sd_from_scratch_with_8_bit_activations_gradients_and_the_compressibility_loss(tmp_path):
    summary = trainer.train_and_evaluate(
        _config(model__sd=True, sd__activation_bits=8, sd__gradient_bits=8, optim__switch_bar=4,
                optim__compressibility_weight=0.5), str(tmp_path))
    assert 0 <= summary["accuracy"] <= 1 and summary["sd"] is True
    assert summary["compression_ratio"] > 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [line["compressibility"] for line in lines if "loss" in line]
    assert len(logged) == summary["steps"] and all(0 < value <= 1 for value in logged)


def test_low_bit_stored_activations_cut_the_train_steps_peak_memory(tmp_path):
    """ResNet-20 with sd.stored_activation_bits=4: its convs, batch norms and ReLUs keep codes and bits
    for backprop, so the compiled step's peak is well under the exact step's."""
    config = _config(model__name="resnet20", input__batch_size=32, sd__stored_activation_bits=4)
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert summary["stored_activation_bits"] == 4 and 0 < summary["peak_memory_ratio"] < 0.5


def test_latent_update_of_stored_power_of_two_coefficients_is_refused(tmp_path):
    config = tiny_config(model__sd=True, optim__coeff_update="latent", sd__mode="pow2")
    with pytest.raises(ValueError, match="sd.mode='latent'"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))


def _scripted_evaluation(monkeypatch, accuracy_after_step):
    """Evaluations that report `accuracy_after_step[step]` for the state after `step`."""
    def evaluate(eval_step, state, pipeline, mesh, progress, stage="eval"):
        return {"loss": 1.0, "accuracy": accuracy_after_step[int(state.step)]}

    monkeypatch.setattr(trainer, "_evaluate", evaluate)


def _evaluations(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]
    return [line for line in lines if "eval_accuracy" in line]


def test_evaluates_each_epoch_keeps_the_best_checkpoint_and_resumes_the_best(tmp_path, monkeypatch):
    from sd_jax.train.train_checkpoint import TrainCheckpoints

    _scripted_evaluation(monkeypatch, {4: 0.3, 8: 0.9, 12: 0.5, 16: 0.4})  # 4 steps an epoch
    config = _config(optim__epochs=4, ckpt__every_steps=2, ckpt__keep_last=2)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    assert (full["accuracy"], full["best_accuracy"], full["best_step"]) == (0.4, 0.9, 8)
    assert [(e["step"], e["epoch"], e["eval_accuracy"]) for e in _evaluations(str(tmp_path / "full"))] == [
        (4, 1, 0.3), (8, 2, 0.9), (12, 3, 0.5), (16, 4, 0.4)]
    checkpoints = TrainCheckpoints(str(tmp_path / "full" / "checkpoints"), every_steps=2)
    assert checkpoints.all_steps() == [8, 14, 16] and checkpoints.metrics(8) == {"accuracy": 0.9}
    checkpoints.close()

    # Killed at step 15; resumed from step 14, whose best (step 8) is older than the kept checkpoints.
    resumed = _preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch, at_call=15)
    assert {k: resumed[k] for k in ("accuracy", "best_accuracy", "best_step")} == {
        k: full[k] for k in ("accuracy", "best_accuracy", "best_step")}


def test_evaluates_every_n_steps_when_asked(tmp_path, monkeypatch):
    _scripted_evaluation(monkeypatch, {6: 0.5, 8: 0.25})
    summary = trainer.train_and_evaluate(_config(optim__epochs=2, eval__every_steps=6), str(tmp_path))
    assert [(e["step"], e["epoch"]) for e in _evaluations(str(tmp_path))] == [(6, 1.5), (8, 2.0)]  # and at the end
    assert (summary["accuracy"], summary["best_accuracy"], summary["best_step"]) == (0.25, 0.5, 6)
    assert "best_swa_accuracy" not in summary


def test_swa_averages_each_epoch_from_the_start_epoch_and_evaluates_each_average(tmp_path):
    import jax

    from sd_jax.train import swa
    from sd_jax.io import load_variables

    config = _config(model__sd=True, optim__coeff_update="latent", sd__mode="latent", sd__threshold=4e-3,
                     optim__epochs=3, swa__start_epoch=2, ckpt__keep_last=10)
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    evaluations = _evaluations(str(tmp_path))
    assert [e["step"] for e in evaluations] == [4, 8, 12] and "swa_eval_accuracy" not in evaluations[0]
    swa_accuracies = [e["swa_eval_accuracy"] for e in evaluations[1:]]
    assert summary["best_swa_accuracy"] == max(swa_accuracies) and summary["accuracy"] == swa_accuracies[-1]
    assert summary["best_accuracy"] == max(e["eval_accuracy"] for e in evaluations)
    assert summary["best_swa_step"] in (8, 12)
    state = _final_state(config, tmp_path)  # the final checkpoint: the SWA model
    average = swa.find_state(state.opt_state)
    assert int(average.averaged) == 2  # after epochs 2 and 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.trainable["params"]),
                 jax.device_get(average.average["params"]))
    coeffs = load_variables(str(tmp_path / "checkpoints"))["sd_coeff"]
    for leaf in jax.tree.leaves(coeffs):
        mantissa, _ = np.frexp(np.asarray(leaf, np.float64))
        assert ((np.asarray(leaf) == 0) | ((np.abs(mantissa) == 0.5) & (np.abs(leaf) >= 2**-8))).all()


def test_bad_evaluation_and_swa_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="eval.every_steps"):
        trainer.train_and_evaluate(_config(eval__every_steps=-1), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="swa.start_epoch=3"):
        trainer.train_and_evaluate(_config(optim__epochs=2, swa__start_epoch=3), str(tmp_path / "b"))


def test_batch_norm_batches_are_a_whole_training_epoch_read_aside():
    from sd_jax import data

    pipeline = data.input_pipeline("mnist", "train", batch_size=16, seed=0)  # 4 batches an epoch
    epoch_0 = [next(pipeline) for _ in range(4)]
    position = pipeline.get_state()
    aside = list(trainer._training_epoch(pipeline, 0, 0))
    assert len(aside) == 4 and pipeline.get_state() == position
    for ours, theirs in zip(aside, epoch_0):
        np.testing.assert_array_equal(ours["image"], theirs["image"])
    assert len(list(trainer._training_epoch(pipeline, 0, 2))) == 2


def test_dense_training_projected_onto_sd_form_every_epoch_with_swa(tmp_path, monkeypatch):
    """The authors' inference-only rule: a trained dense model, fine-tuned dense (`--mode=finetune`
    with init.from_params), its kernels and those of its SWA average replaced by C·B after every epoch."""
    import jax

    from sd_jax.nn import report
    from sd_jax.train import projection, swa
    from sd_jax.io import load_variables

    dense_dir = str(tmp_path / "dense")
    trainer.train_and_evaluate(_config(), dense_dir)
    original, projections = projection.project, []

    def recorded(params, rules):
        projections.append(original(params, rules))
        return projections[-1]

    monkeypatch.setattr(projection, "project", recorded)
    config = _config(init__from_params=os.path.join(dense_dir, "checkpoints"), optim__epochs=2,
                     optim__project_every_epoch=True, optim__schedule="step", optim__step_epochs=1,
                     swa__start_epoch=1, sd__threshold=1e-3, ckpt__keep_last=10)
    workdir = str(tmp_path / "projected")
    summary = trainer.train_and_evaluate(config, workdir)
    assert len(projections) == 4  # the model, then the SWA average, after each of the 2 epochs
    evaluations = _evaluations(workdir)
    assert [e["step"] for e in evaluations] == [4, 8] and all("swa_eval_accuracy" in e for e in evaluations)
    assert summary["accuracy"] == evaluations[-1]["swa_eval_accuracy"] and summary["sd"] is False

    # After epoch 1 the model is projected before its evaluation and checkpoint; the first SWA average is
    # that model's weights, so its projection is the same.
    after_epoch_1 = load_variables(os.path.join(workdir, "checkpoints", "4", "state"))["trainable"]["params"]
    for params, _ in projections[:2]:
        jax.tree.map(np.testing.assert_array_equal, after_epoch_1, jax.device_get(params))
    # The result is the projected SWA average, which is also the average later epochs would build on.
    swa_params, swa_decomposition = projections[-1]
    jax.tree.map(np.testing.assert_array_equal, load_variables(os.path.join(workdir, "checkpoints"))["params"],
                 jax.device_get(swa_params))
    state = _final_state(config, workdir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(swa.find_state(state.opt_state).average["params"]),
                 jax.device_get(swa_params))
    # Its storage counts as the SD model of that decomposition.
    totals = report.model_report(swa_decomposition.tree).totals()
    assert summary["density"] == totals["density"] and 0 < summary["density"] < 1
    assert summary["compression_ratio"] > 1


def test_projection_options_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model.sd=True trains the SD form itself"):
        trainer.train_and_evaluate(_config(optim__project_every_epoch=True, model__sd=True), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="eval.every_steps=2: would evaluate weights that are not projected"):
        trainer.train_and_evaluate(_config(optim__project_every_epoch=True, eval__every_steps=2), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="optim.schedule='steps': expected one of 'reference', 'cosine', 'step'"):
        trainer.train_and_evaluate(_config(optim__schedule="steps"), str(tmp_path / "c"))


@pytest.mark.slow
def test_projected_run_resumes_bitwise(tmp_path, monkeypatch):
    import jax

    from sd_jax.io import load_variables

    config = _config(optim__epochs=2, optim__project_every_epoch=True, swa__start_epoch=1, ckpt__every_steps=3)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    # Steps 1-4, 2 eval batches, 2 SWA eval batches (no batch norm), then steps 5 and 6 (saved): 10 calls.
    resumed = _preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch, at_call=11)
    for key in ("accuracy", "loss", "best_accuracy", "best_swa_accuracy", "density", "compression_ratio"):
        assert resumed[key] == full[key], key
    jax.tree.map(np.testing.assert_array_equal, load_variables(str(tmp_path / "full" / "checkpoints")),
                 load_variables(str(tmp_path / "resumed" / "checkpoints")))
    again = trainer.train_and_evaluate(config, str(tmp_path / "full"))  # finished: a decomposition of the result
    assert again["accuracy"] == full["accuracy"] and again["density"] == pytest.approx(full["density"], rel=0.1)


def test_stop_epoch_trains_the_first_epochs_of_the_longer_schedule(tmp_path):
    config = _config(optim__epochs=4, optim__stop_epoch=1, optim__schedule="cosine")
    summary = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 4 and summary["epochs"] == 4 and summary["epochs_run"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [line["learning_rate"] for line in lines if "learning_rate" in line]
    # the rate of a 16-step cosine schedule at step 3, not the end of a 4-step one (0 there)
    assert rates[-1] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 3 / 16)), rel=1e-5)
    with pytest.raises(ValueError, match=r"optim.stop_epoch=5: after the last epoch \(optim.epochs=4\)"):
        trainer.train_and_evaluate(_config(optim__epochs=4, optim__stop_epoch=5), str(tmp_path / "bad"))


@pytest.mark.slow
def test_a_storage_target_allocates_on_the_dense_checkpoint_and_a_resumed_run_reuses_it(tmp_path, monkeypatch):
    """The allocation is chosen once on the dense kernels, written to the workdir and read back on resume
    (bit-for-bit); the bucket switch keeps each layer's C at or above its own smallest magnitude.
    About 3 minutes on 2 loaded cores (the search compiles a decomposition per candidate shape)."""
    import jax

    from sd_jax import models
    from sd_jax.core import pow2
    from sd_jax.io import atomic_savez, flatten, load_variables
    from sd_jax.models.synthetic import he_normal_params
    from sd_jax.nn import allocate

    npz = str(tmp_path / "dense.npz")
    params = he_normal_params(models.get("mlp", num_classes=10), (1, 28, 28, 1))
    atomic_savez(npz, {f"params/{key}": value for key, value in flatten(params).items()})
    config = _config(model__sd=True, init__from_params=npz, sd__target_compression=6.0, sd__iterations=4,
                     optim__epochs=2, optim__lr=0.01, optim__switch_bar=3, ckpt__every_steps=3)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
    rules = allocate.read_rules(str(tmp_path / "full" / allocate.ALLOCATION_FILE))
    assert len({options["threshold"] for _, options in rules}) > 1
    assert full["compression_ratio"] == pytest.approx(6.0, rel=0.15)
    coefficients = flatten(load_variables(str(tmp_path / "full" / "checkpoints"))["sd_coeff"])
    thresholds = {pattern.strip("^$"): options["threshold"] for pattern, options in rules}
    for path, coeff in coefficients.items():
        nonzero = np.abs(coeff[coeff != 0])
        assert nonzero.min() >= pow2.min_coeff(thresholds[path.removesuffix("/coeff")])

    searches, search = [], allocate.allocate
    monkeypatch.setattr(allocate, "allocate", lambda *args, **kwargs: searches.append(1) or search(*args, **kwargs))
    resumed = _preempted_then_resumed(config, str(tmp_path / "resumed"), monkeypatch, at_call=6)
    assert len(searches) == 1
    assert resumed["loss"] == full["loss"] and resumed["accuracy"] == full["accuracy"]
    jax.tree.map(np.testing.assert_array_equal, load_variables(str(tmp_path / "full" / "checkpoints")),
                 load_variables(str(tmp_path / "resumed" / "checkpoints")))


def test_a_target_needs_a_dense_checkpoint_to_start_from(tmp_path):
    from sd_jax.train.config_check import check_training_config

    dense = tmp_path / "dense.npz"
    dense.write_bytes(b"")
    with pytest.raises(ValueError, match="start from a dense checkpoint"):
        check_training_config(_config(model__sd=True, sd__target_compression=6.0))
    with pytest.raises(ValueError, match="training meets storage targets only"):
        check_training_config(_config(model__sd=True, init__from_params=str(dense), sd__target_energy_ratio=0.2))
    with pytest.raises(ValueError, match="training allocates without a calibration; decompose with it"):
        check_training_config(_config(model__sd=True, init__from_params=str(dense), sd__target_compression=6.0,
                                      sd__target_calibration=64))
