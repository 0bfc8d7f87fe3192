"""One check of a run config (the schema of experiments/configs/default.py), before any work starts.

`check_config(config)` raises a one-line ValueError naming the first bad key, its value and the fix
(`optim.lr=-1.0: expected a number > 0; pass e.g. optim.lr=0.1`). The launcher calls it for every mode
(train, finetune, evaluate, decompose, analyze, export) and the trainer at the start of each run, so a
bad value never costs a data load or a compilation. A section the config lacks is not checked (a
config for analyze alone need not describe training); the `sd` section is checked by building its
`SDRules`, which checks every layer and decomposition option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections
from etils import epath

from sd_jax import models
from sd_jax.data import builders, device, registry, settings
from sd_jax.nn.rules import ALLOCATION_KEYS, SDRules
from sd_jax.train.optimizer import COEFF_UPDATES, OPTIMIZERS

SCHEDULES = ("reference", "cosine", "step")
REVIVE_RULES = ("nearest", "ceil")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class _Rule(NamedTuple):
    """A key's test, what it expects (for the message) and an example of a good value."""

    test: Callable[[Any], bool]
    expected: str
    example: Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int, example: int) -> _Rule:
    return _Rule(lambda value: _is_int(value) and value >= low, f"an integer >= {low}", example)


def _number(example: float, *, low: float = 0.0, above: bool = False, below: float | None = None) -> _Rule:
    """A finite number >= low (> low with `above`), and < below when given."""
    def test(value: Any) -> bool:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return False
        return (value > low if above else value >= low) and (below is None or value < below)
    bounds = f"{'>' if above else '>='} {low}" + (f" and < {below}" if below is not None else "")
    return _Rule(test, f"a finite number {bounds}", example)


def _choice(choices: Sequence[str]) -> _Rule:
    return _Rule(lambda value: value in choices, f"one of {', '.join(map(repr, choices))}", choices[0])


def _is_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return isinstance(value, str)


def _empty_or_existing(value: Any) -> bool:
    return isinstance(value, str) and (not value or epath.Path(value).exists())


RULES: dict[str, _Rule] = {
    "log_every": _integer(1, 50),
    "data_dir": _Rule(lambda value: isinstance(value, str), "a folder path ('' for TFDS's default folder)", ""),
    "input.dataset": _choice(registry.names()),
    "input.data_dir": _Rule(lambda value: isinstance(value, str), "a folder path ('' for TFDS's default folder)", ""),
    "input.batch_size": _integer(1, 128),
    "input.eval_batch_size": _integer(1, 500),
    "input.setting": _choice(settings.SETTINGS),
    "input.part": _choice(settings.PARTS),
    "input.split_rule": _choice(settings.SPLIT_RULES),
    "input.placement": _choice(device.PLACEMENTS),
    "input.device_bytes": _integer(0, 1 << 30),
    "input.decode_threads": _integer(0, 8),
    "model.name": _choice(tuple(models.names())),
    "model.options.dtype": _choice(COMPUTE_DTYPES),
    "init.from_params": _Rule(lambda value: _empty_or_existing(value),
                              "'' (fresh weights) or the path of an .npz or Orbax checkpoint", ""),
    "init.reset": _Rule(_is_regex, "a regular expression of layer names ('' for none)", "^head/"),
    "sd.group_size": _integer(1, 64),
    "sd.row_length": _integer(1, 3),
    "sd.max_rows": _integer(1, 192),
    "sd.max_kernel_size": _integer(1, 5),
    "optim.epochs": _integer(1, 200),
    "optim.stop_epoch": _integer(0, 0),
    "optim.lr": _number(0.1, above=True),
    "optim.schedule": _choice(SCHEDULES),
    "optim.warmup_steps": _integer(0, 0),
    "optim.step_epochs": _integer(1, 30),
    "optim.step_factor": _number(0.5, above=True),
    "optim.momentum": _number(0.9, below=1.0),
    "optim.weight_decay": _number(5e-4),
    "optim.coeff_update": _choice(COEFF_UPDATES),
    "optim.optimizer": _choice(OPTIMIZERS),
    "optim.switch_bar": _integer(1, 1),
    "optim.update_threshold": _number(0.0),
    "optim.revive_at": _choice(REVIVE_RULES),
    "optim.compressibility_weight": _number(10.0),
    "ckpt.every_steps": _integer(1, 1000),
    "ckpt.keep_last": _integer(1, 2),
    "ckpt.keep_best": _integer(0, 1),
    "sharding.shard_min_size": _integer(0, 0),
    "eval.every_steps": _integer(0, 0),
    "swa.start_epoch": _integer(0, 0),
    "swa.lr": _number(0.05, above=True),
    "swa.bn_batches": _integer(0, 0),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    """(found, value) of the dotted `key` in `config`."""
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ValueError(f"{key}={value!r}: {problem}; {fix}")


_SD_WHERE = re.compile(r"^(layer )?'?SDRules defaults'?: ")


def _check_sd(config: ml_collections.ConfigDict) -> None:
    """Each `sd` option alone (the checks of `SDRules`, which name the option), then all of them together."""
    defaults = SDRules.option_defaults()
    for key, value in config.sd.items():
        if f"sd.{key}" in RULES or key in ALLOCATION_KEYS:
            continue
        try:
            SDRules([tuple(rule) for rule in value]) if key == "rules" else SDRules(**{key: value})
        except (ValueError, TypeError) as error:
            fix = ("pass (pattern, options) pairs, e.g. [('^head/dense$', {'skip': True})]" if key == "rules"
                   else f"pass e.g. sd.{key}={defaults[key]!r}" if key in defaults else "remove it")
            problem = _SD_WHERE.sub("", str(error))
            if "; pass" in problem:  # the option's own check gives the fix
                raise ValueError(f"sd.{key}={value!r}: {problem}") from None
            _fail(f"sd.{key}", value, problem, fix)
    try:
        SDRules.target_of(config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{error}; pass e.g. sd.target_compression=12.0, or 0 for no target") from None
    SDRules.method_of(config)  # checks the calibration too
    try:
        SDRules.from_config(config)
    except ValueError as error:
        raise ValueError(f"sd options that do not go together: {_SD_WHERE.sub('', str(error))}") from None


def _check_across(config: ml_collections.ConfigDict) -> None:
    """Options that are fine alone but not together."""
    if "optim" not in config:
        return
    optim, sd_model = config.optim, "model" in config and config.model.sd
    if optim.stop_epoch > optim.epochs:
        _fail("optim.stop_epoch", optim.stop_epoch, f"after the last epoch (optim.epochs={optim.epochs})",
              "pass 0 to train every epoch of the schedule, or the epoch to stop after")
    if "swa" in config and config.swa.start_epoch > optim.epochs:
        _fail("swa.start_epoch", config.swa.start_epoch, f"after the last epoch (optim.epochs={optim.epochs})",
              f"pass a start epoch from 1 to {optim.epochs}, or 0 for no SWA")
    if optim.project_every_epoch and sd_model:
        _fail("optim.project_every_epoch", True, "projects a dense model's kernels onto SD form, but model.sd=True "
              "trains the SD form itself", "set model.sd=False (the authors' inference-only rule) or "
              "optim.project_every_epoch=False")
    if optim.project_every_epoch and "eval" in config and config.eval.every_steps:
        _fail("eval.every_steps", config.eval.every_steps, "would evaluate weights that are not projected "
              "(optim.project_every_epoch projects once an epoch)", "set eval.every_steps=0")
    if optim.get("compressibility_weight", 0.0) > 0 and not sd_model:
        _fail("optim.compressibility_weight", optim.compressibility_weight, "acts on the coefficients C of SD "
              "layers, but model.sd=False trains a dense model", "set model.sd=True or "
              "optim.compressibility_weight=0")
    if sd_model and optim.coeff_update in ("latent", "quantize_each_step") and config.sd.mode == "pow2":
        _fail("optim.coeff_update", optim.coeff_update, "trains C as a float, but sd.mode='pow2' uses C as stored, "
              "so the weights would leave the powers of two", "set sd.mode='latent' (the layer then re-quantizes C "
              "every step) or optim.coeff_update='bucket_switch'")


def _check_data_dirs(config: ml_collections.ConfigDict) -> None:
    """A data folder that does not exist, refused with the command that prepares the dataset into it."""
    dataset = _lookup(config, "input.dataset")[1]
    for key in ("data_dir", "input.data_dir"):
        found, value = _lookup(config, key)
        if found and value and not epath.Path(value).is_dir():
            prepare = f"prepare the data there: {builders.command(dataset, value)}" if dataset in registry.names() \
                else "prepare the data there"
            _fail(key, value, "no such folder of prepared data", f"{prepare}; or pass '' for TFDS's default folder")


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` itself when every key it has holds a value sd_jax can follow; else ValueError naming the key."""
    for key, rule in RULES.items():
        found, value = _lookup(config, key)
        if found and not rule.test(value):
            _fail(key, value, f"expected {rule.expected}", f"pass e.g. {key}={rule.example!r}")
    _check_data_dirs(config)
    if "sd" in config:
        _check_sd(config)
    _check_across(config)
    return config


def check_training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`check_config`, and what only training refuses: a target that is not a storage target of an SD model
    fine-tuned from a dense checkpoint (its per-layer settings are chosen on those dense kernels)."""
    check_config(config)
    target = SDRules.target_of(config) if "sd" in config else None
    if target is None:
        return config
    if target.counts_energy:
        raise ValueError(f"sd.{target.describe()}: training meets storage targets only; decompose the dense model "
                         "for the energy target (--mode=decompose --output=sd.npz), then train with "
                         "init.from_params=sd.npz and config.sd.rules = "
                         "sd_jax.nn.allocate.read_rules('sd.npz.sd_allocation.json'), the target keys at 0")
    if not (config.model.sd and config.init.from_params):
        raise ValueError(f"sd.{target.describe()} chooses the thresholds on dense weights: start from a dense "
                         "checkpoint (model.sd=True, init.from_params=<dense checkpoint or .npz>)")
    calibration = SDRules.calibration_of(config)
    if calibration:
        raise ValueError(f"sd.target_calibration={calibration}: training allocates without "
                         "a calibration; decompose with it (--mode=decompose --output=sd.npz), then train with "
                         "init.from_params=sd.npz and config.sd.rules = "
                         "sd_jax.nn.allocate.read_rules('sd.npz.sd_allocation.json'), the target keys at 0")
    return config
