"""Character-level language modelling: the SD Transformer on the Debian `fortunes` text (docs/language.md).

    python -m sd_jax.data.prepare fortunes_chars      # once; needs `sudo apt-get install -y fortunes`
    python -m launch.main --mode=train --config=experiments/configs/language.py:dense \\
        --workdir=runs/fortunes_transformer_dense
    python -m launch.main --mode=finetune --config=experiments/configs/language.py:inference_only \\
        --workdir=runs/fortunes_transformer_sd --config.init.from_params=runs/fortunes_transformer_dense/checkpoints
    python -m launch.main --mode=train --config=experiments/configs/language.py:sd_scratch \\
        --workdir=runs/fortunes_transformer_sd_scratch

Argument "setting[,recipe]": dense, inference_only (the dense run decomposed, then fine-tuned in SD
form) or sd_scratch (SD from the start), with the settings and the "tuned" recipe of `paper.py` (the
authors never trained a Transformer). Model: `transformer_lm`, 4 pre-LN blocks of width 128, 4 heads,
context 128, byte vocabulary; its attention and MLP projections are SD, the embedding and the head stay
dense (`EMBED_AND_HEAD_DENSE`; drop those rules to make them SD too). Loss in bits per character
(summary `bits_per_char`). SGD with momentum on a cosine schedule; sized to about 10 minutes on 2 CPU
cores (docs/language.md has the measured step time).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import default, paper

SETTINGS = ("dense", "inference_only", "sd_scratch")
EMBED_AND_HEAD_DENSE = [("^embed/dense$", {"skip": True}), ("^head/dense$", {"skip": True})]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` is "setting[,recipe]", e.g. "dense" or "inference_only,tuned"."""
    parts = (arg or "dense").split(",")
    if len(parts) not in (1, 2) or parts[0] not in SETTINGS:
        raise ValueError(f"config argument {arg!r} is not 'setting[,recipe]' with a setting of {SETTINGS} "
                         "(e.g. dense)")
    config = default.get_config()
    config.input.dataset = "fortunes_chars"
    config.input.batch_size = 32
    config.input.eval_batch_size = 250
    config.model.name = "transformer_lm"
    config.model.options.update(dict(num_layers=4, width=128, heads=4, mlp_ratio=4, context=128))
    config.optim.optimizer = "adam"
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 50
    config.optim.lr = 3e-3
    config.optim.epochs = 2
    config.optim.weight_decay = 0.0
    config.log_every = 25
    config.ckpt.every_steps = 200
    config = paper.apply_setting(config, parts[0], parts[1] if len(parts) == 2 else "tuned")
    config.sd.rules = EMBED_AND_HEAD_DENSE
    if parts[0] == "inference_only":
        config.optim.epochs = 1
        config.optim.lr = 1e-3
    return config
