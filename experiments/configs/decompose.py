"""Decompose a trained parameter tree with the reference settings (DESIGN.md 1.3).

    python -m launch.main --mode=decompose --params=PATH [--output=OUT.npz] [--json] \
        --config=experiments/configs/decompose.py --config.sd.threshold=4e-3

CPU is enough: a ResNet-50 takes a few seconds after compilation. `sd.rules` holds
(regex, options) pairs for per-layer settings; the first match wins, {"skip": True} keeps a kernel
dense, {"kind": "depthwise"} marks depthwise kernels (they cannot be told apart by shape).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.sd = ml_collections.ConfigDict(dict(
        threshold=1e-3,
        max_coeff=32.0,
        iterations=30,
        pow2=True,
        row_threshold=0.0,
        prune_fraction=0.0,
        prune_group=32,
        row_scale=False,
        decay_steps=0,
        threshold_decay=0.5,
        group_size=64,
        row_length=3,
        max_rows=192,
        max_kernel_size=5,
        rules=[],
    ))
    return config
