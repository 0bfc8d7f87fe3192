"""A tiny training config for trainer tests: MLP on mock MNIST (64 images), batch 16, 4 steps an epoch."""

import ml_collections

from experiments.configs import default


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """`default` shrunk; `changes` are `section__key=value` overrides."""
    config = default.get_config()
    config.input.dataset = "mnist"
    config.input.batch_size = 16
    config.input.eval_batch_size = 32
    config.model.name = "mlp"
    config.optim.epochs = 1
    config.optim.lr = 0.05
    config.log_every = 1
    config.ckpt.every_steps = 2
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config
