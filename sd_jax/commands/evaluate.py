"""`--mode=evaluate --params=PATH`: accuracy and loss of saved variables (dense or SD, any parameter file)
on the evaluation split of the config's dataset and setting (an adaptation part's classes included).
Without `--params` the launcher evaluates the latest checkpoint of `--workdir` (`sd_jax.train.trainer`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax

from sd_jax.commands import inputs
from sd_jax.nn.rules import SDRules
from sd_jax.train.step import create_train_state, eval_figures, eval_step


def evaluate(config: Any, params_path: str) -> dict[str, float]:
    """{"accuracy", "loss"} of the variables at `params_path` in the model `config` describes (and
    "bits_per_char" on a text dataset)."""
    if config is None or "input" not in config:
        raise ValueError("evaluate needs a config that describes a run (an `input` section with the dataset): "
                         "pass --config=experiments/configs/default.py or the run's config")
    target = inputs.target_of(config)
    variables = inputs.read_variables(params_path)
    model = target.build(SDRules.from_config(config) if inputs.is_sd(variables) else None)
    placed = inputs.arranged(variables, model, target, params_path, required=None)
    state = create_train_state(model.apply, placed, optax.identity(), jax.random.key(config.seed))
    pipeline = inputs.pipeline(config, "eval", config.input.eval_batch_size)
    step = jax.jit(functools.partial(eval_step, input_key=pipeline.spec.input_key))
    totals = np.zeros(3)
    for _ in range(pipeline.steps_per_epoch):
        out = jax.device_get(step(state, next(pipeline)))
        totals += [out["loss_sum"], out["correct"], out["count"]]
    return eval_figures(*totals, text=pipeline.spec.task == "language_model")
