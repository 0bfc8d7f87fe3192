"""A bad-option matrix (issue 13, item 7): every key of experiments/configs/default.py with a bad value.

The keys are read from the config itself, so a key added later fails `test_every_key_is_covered` until
it gets a bad value here or a reason why every value is acceptable. Each bad value must be refused by
`check_config` (which every mode and the trainer call before any work) with one line naming the key.
"""

import os

import flax
import ml_collections
import pytest

from experiments.configs import default
from sd_jax.train.config_check import check_config

# key -> a value sd_jax cannot follow (wrong type, out of range, unknown choice, negative count, ...).
BAD = {
    "log_every": 0,
    "data_dir": "/no/such/prepared/data",
    "input.dataset": "cifar11",
    "input.data_dir": "/no/such/prepared/data",
    "input.batch_size": 0,
    "input.eval_batch_size": -500,
    "input.setting": "transfer",
    "input.part": "both",
    "input.split_rule": "random",
    "input.placement": "gpu",
    "input.device_bytes": -1,
    "input.decode_threads": 2.5,
    "model.name": "resnet21",
    "model.options.dtype": "int8",
    "init.from_params": "/no/such/checkpoint.npz",
    "init.reset": "head/(",
    "sd.activation_bits": 0,
    "sd.activation_range": "global",
    "sd.decay_steps": -1,
    "sd.gradient_bits": 64,
    "sd.group_size": 0,
    "sd.init_scheme": "xavier",
    "sd.iterations": 0,
    "sd.max_coeff": 30.0,
    "sd.max_kernel_size": 0,
    "sd.max_rows": -3,
    "sd.mode": "float",
    "sd.prune_criterion": "magnitude",
    "sd.prune_fraction": 1.5,
    "sd.prune_group": 0,
    "sd.prune_threshold": -0.1,
    "sd.range_momentum": 1.0,
    "sd.row_length": 0,
    "sd.row_threshold": float("nan"),
    "sd.stored_activation_bits": 3,
    "sd.rules": [("stage1(", {"skip": True})],
    "sd.threshold": -1e-3,
    "sd.threshold_decay": 2.0,
    "sd.threshold_scale": "block",
    "sd.target_bytes": -1.0,
    "sd.target_compression": 0.5,
    "sd.target_energy_ratio": -0.5,
    "sd.target_calibration": -1,
    "sd.target_method": "layerwise",
    "optim.coeff_update": "adam",
    "optim.compressibility_weight": -0.1,
    "optim.optimizer": "lamb",
    "optim.epochs": 0,
    "optim.lr": -1.0,
    "optim.momentum": 1.5,
    "optim.revive_at": "floor",
    "optim.schedule": "linear",
    "optim.step_epochs": 0,
    "optim.step_factor": 0.0,
    "optim.stop_epoch": -1,
    "optim.switch_bar": 0,
    "optim.update_threshold": float("inf"),
    "optim.warmup_steps": -10,
    "optim.weight_decay": -5e-4,
    "ckpt.every_steps": 0,
    "ckpt.keep_best": -1,
    "ckpt.keep_last": 0,
    "sharding.shard_min_size": -1,
    "eval.every_steps": -1,
    "swa.start_epoch": -1,
    "swa.lr": 0.0,
    "swa.bn_batches": -1,
}
# Keys whose every value of their type is acceptable (a value of another type is refused by ml_collections
# on the command line), and why.
ANY_VALUE = {
    "seed": "any integer seeds the PRNG (negative ones wrap, as jax.random.key does)",
    "input.split_seed": "any integer seeds the split permutation",
    "setting": "a label written into summary.json for the tables; '' falls back to input.setting",
    "recipe": "a label written into summary.json for the tables",
    "departures": "free sentences written into the run's config",
    "model.sd": "a bool: dense or SD, both valid",
    "optim.reset_counters_every_epoch": "a bool: both valid",
    "optim.project_every_epoch": "a bool: both valid alone (checked against model.sd and eval.every_steps below)",
}
# Values that are fine alone but not with the rest of the default config.
ACROSS = {
    "optim.stop_epoch": {"optim.stop_epoch": 201},
    "swa.start_epoch": {"swa.start_epoch": 201},
    "optim.project_every_epoch": {"optim.project_every_epoch": True, "model.sd": True},
    "eval.every_steps": {"optim.project_every_epoch": True, "eval.every_steps": 10},
    "optim.coeff_update": {"optim.coeff_update": "latent", "model.sd": True},
    "optim.compressibility_weight": {"optim.compressibility_weight": 0.1, "model.sd": False},
    "sd.target_method": {"sd.target_method": "uniform", "sd.target_calibration": 64},
}


def _keys(config):
    return sorted(flax.traverse_util.flatten_dict(config.to_dict(), sep=".", is_leaf=lambda _, node: not node))


def _with(changes):
    """The default config with `changes` ({dotted key: value}) set, type checks of ConfigDict bypassed."""
    tree = default.get_config().to_dict()
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = value
    return ml_collections.ConfigDict(tree)


def test_every_key_is_covered():
    keys = _keys(default.get_config())
    assert not set(BAD) & set(ANY_VALUE)
    assert sorted(set(BAD) | set(ANY_VALUE)) == keys, "a config key has no bad value and no reason to accept any"


def test_the_default_config_and_the_examples_pass():
    check_config(default.get_config())


def _assert_refused(changes, key):
    with pytest.raises(ValueError) as error:
        check_config(_with(changes))
    message = str(error.value)
    assert "\n" not in message and len(message) < 600, message
    assert message.startswith(f"{key}="), message
    assert "pass" in message or "set" in message, message  # the fix


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_refused_naming_its_key(key):
    _assert_refused({key: BAD[key]}, key)


@pytest.mark.parametrize("key", sorted(ACROSS))
def test_values_that_do_not_go_together_are_refused(key):
    _assert_refused(ACROSS[key], key)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_non_finite_compressibility_weight_is_refused(weight):
    _assert_refused({"optim.compressibility_weight": weight}, "optim.compressibility_weight")


def test_sd_options_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match=r"^sd options that do not go together: threshold=16.0 exceeds max_coeff=8.0"):
        check_config(_with({"sd.threshold": 16.0, "sd.max_coeff": 8.0}))


def test_a_section_the_config_lacks_is_not_checked():
    config = ml_collections.ConfigDict({"model": {"name": "resnet20"}})
    assert check_config(config) is config


@pytest.mark.slow
def test_the_launcher_refuses_a_bad_value_in_one_line_before_any_work(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "launch.main", "--mode=decompose", "--params=/no/such.npz",
                           "--config.optim.lr=-1.0"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: optim.lr=-1.0: expected a finite number > 0.0; pass e.g. optim.lr=0.1")
