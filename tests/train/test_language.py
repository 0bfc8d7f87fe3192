"""The language-modelling path through the one trainer: transformer_lm on mock fortunes_chars windows."""
import math
import os

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import language
from sd_jax import models
from sd_jax.commands import analyze
from sd_jax.nn.rules import SDRules
from sd_jax.train import trainer
from sd_jax.train.config_check import check_config

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
    config.optim.epochs = 1
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_sd_from_scratch_trains_and_reports_bits_per_char(tmp_path):
    summary = trainer.train_and_evaluate(_config("sd_scratch"), str(tmp_path / "scratch"))
    assert summary["steps"] == 4 and summary["dataset"] == "fortunes_chars" and summary["setting"] == "sd_scratch"
    assert summary["bits_per_char"] == pytest.approx(summary["loss"] / math.log(2))
    assert 0 <= summary["accuracy"] <= 1 and summary["compression_ratio"] > 1


@pytest.mark.slow  # 54 s on 2 busy cores (2026-11-30): two trainings and an analysis of the transformer
def test_dense_then_decompose_and_finetune_then_analyze(tmp_path):
    dense_dir = str(tmp_path / "dense")
    dense = trainer.train_and_evaluate(_config("dense"), dense_dir)
    assert dense["compression_ratio"] == 1.0 and math.isfinite(dense["bits_per_char"])
    config = _config("inference_only", init__from_params=os.path.join(dense_dir, "checkpoints"))
    sd = trainer.train_and_evaluate(config, str(tmp_path / "sd"))
    assert sd["compression_ratio"] > 1 and sd["setting"] == "inference_only"
    evaluated = trainer.evaluate(config, str(tmp_path / "sd"))
    assert evaluated["bits_per_char"] == pytest.approx(sd["bits_per_char"], rel=1e-5)
    report = analyze(config, os.path.join(tmp_path, "sd", "checkpoints"), output_format="json")
    assert '"block0/attention/query"' in report and '"head/dense"' in report


def test_configs_pass_the_check_and_keep_the_embedding_and_head_dense():
    for setting in language.SETTINGS:
        config = language.get_config(setting)
        check_config(config)
        assert (config.input.dataset, config.model.name, config.setting) == ("fortunes_chars", "transformer_lm", setting)
    model = models.get("transformer_lm", num_classes=256, sd=SDRules.from_config(language.get_config("sd_scratch")))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), train=False))
    assert set(shapes["sd_coeff"]) == {f"block{i}" for i in range(4)} and {"embed", "head"} <= set(shapes["params"])
    with pytest.raises(ValueError, match="setting"):
        language.get_config("adaptation")
