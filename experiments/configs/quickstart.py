"""Configs of the quickstart's two trainer runs (`experiments/quickstart.py`): Fashion-MNIST, ResNet-20.

    python -m experiments.quickstart --config=experiments/configs/quickstart.py:dense \\
        --sd_config=experiments/configs/quickstart.py:sd --sd_config.optim.epochs=1

Argument "dense" (the default): the dense run, 2 epochs, cosine lr from 0.1. "sd": the same run in
the paper's inference-only setting by the tuned recipe (`paper.apply_setting`: the dense model
decomposed, then fine-tuned in SD form with the bucket-switch update of C), 1 epoch; the quickstart
points its `init.from_params` at the dense run's checkpoints. About 12 minutes on 2 CPU cores, both.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import default, paper

STAGES = ("dense", "sd")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of quickstart stage `arg` (one of STAGES; default "dense")."""
    stage = arg or "dense"
    if stage not in STAGES:
        raise ValueError(f"quickstart stage {arg!r}: pass one of {STAGES}, e.g. experiments/configs/quickstart.py:sd")
    config = default.get_config()
    config.input.dataset = "fashion_mnist_idx"
    config.model.name = "resnet20"
    config.optim.epochs = 2
    config.optim.lr = 0.1
    config.optim.schedule = "cosine"
    config.log_every = 20
    config.ckpt.every_steps = 200
    if stage == "dense":
        return paper.apply_setting(config, "dense", "tuned")
    config = paper.apply_setting(config, "inference_only", "tuned")
    config.optim.epochs = 1
    return config
