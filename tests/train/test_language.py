"""The language-modelling path through the one trainer: transformer_lm on mock fortunes_chars windows."""
import math
import os

import pytest

from experiments.configs import language
from sd_jax.commands import analyze
from sd_jax.train import trainer

pytestmark = pytest.mark.usefixtures("mock_tfds")

TINY_MODEL = dict(num_layers=1, width=16, heads=2, mlp_ratio=2)


def _config(setting: str, **changes):
    """language.py's `setting` on the 64 mock windows: a one-block model, batch 16, 4 steps."""
    config = language.get_config(setting)
    config.input.batch_size = 16
    config.input.eval_batch_size = 32
    config.model.options.update(TINY_MODEL)
    config.eval.every_steps = 0
    config.ckpt.every_steps = 4
    config.log_every = 1
    config.optim.warmup_steps = 0
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_sd_from_scratch_trains_and_reports_bits_per_char(tmp_path):
    summary = trainer.train_and_evaluate(_config("sd_scratch"), str(tmp_path / "scratch"))
    assert summary["steps"] == 4 and summary["dataset"] == "fortunes_chars" and summary["setting"] == "sd_scratch"
    assert summary["bits_per_char"] == pytest.approx(summary["loss"] / math.log(2))
    assert 0 <= summary["accuracy"] <= 1 and summary["compression_ratio"] > 1


@pytest.mark.slow  # about 40 s on 2 busy cores: two trainings and an analysis of the transformer
def test_dense_then_decompose_and_finetune_then_analyze(tmp_path):
    dense_dir = str(tmp_path / "dense")
    dense = trainer.train_and_evaluate(_config("dense"), dense_dir)
    assert dense["compression_ratio"] == 1.0 and math.isfinite(dense["bits_per_char"])
    config = _config("inference_only", init__from_params=os.path.join(dense_dir, "checkpoints"))
    sd = trainer.train_and_evaluate(config, str(tmp_path / "sd"))
    assert sd["compression_ratio"] > 1 and sd["setting"] == "inference_only"
    evaluated = trainer.evaluate(config, str(tmp_path / "sd"))
    assert evaluated["bits_per_char"] == pytest.approx(sd["bits_per_char"], rel=1e-5)
    report = analyze.analyze(config, os.path.join(tmp_path, "sd", "checkpoints"), output_format="json")
    assert '"block0/attention/query"' in report and '"head/dense"' in report
