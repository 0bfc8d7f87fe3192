"""Energy and storage ratios, dense (32-bit float and 8-bit int) against SD, beside the paper's headlines.

    python -m experiments.energy_table [--models=resnet20,vgg19,mobilenet_v2,resnet50_imagenet]
        [--table=horowitz45nm] [--json]

For each model: He-normal random weights (seeded; no trained checkpoints are used), decomposed
with the `sd` section of experiments/configs/default.py; the SD view runs 8-bit activations
and rebuilt 8-bit weights with B at 32 bits, on the default hardware of `sd_jax.cost.comparison`
(Eyeriss-like: 108 KiB buffer, 168 PEs, weight-stationary, zero skipping); inference at batch 1,
training at batch 128 (CIFAR 50,000 / ImageNet 1,281,167 images per epoch). Ratios are dense / SD;
the main keys compare with dense 32-bit float, the `_vs_int8` keys with dense 8-bit int. About 2-4
minutes on 2 CPU cores (the decompositions dominate); the last line with --json is one JSON object.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import benchmarking
from experiments.configs import default
from sd_jax.commands import inputs
from sd_jax.commands.analyze import network_of
from sd_jax.cost import analysis, comparison

PAPER = dict(inference_energy_ratio=2.44, training_storage_ratio=10.56, training_energy_ratio=4.48)
RATIOS = ("inference_energy_ratio", "storage_ratio", "training_energy_ratio", "training_storage_ratio")

MODELS = ("resnet20", "vgg19", "mobilenet_v2", "resnet50_imagenet")
_TABLE = flags.DEFINE_string("table", "horowitz45nm", "Energy table name or JSON path.")


def model_entry(name: str, table: str) -> dict:
    """Ratios of one model against dense 32-bit float and dense 8-bit int."""
    config = default.get_config()
    network, _ = network_of(config, inputs.target_of(config, name), None)
    options = dict(comparison.COST_DEFAULTS, table=table,
                   dataset_size=1281167 if name.endswith("_imagenet") else 50000)
    vs32 = analysis.summary(comparison.analysis_of(network, name, options))
    vs8 = analysis.summary(comparison.analysis_of(network, name, dict(options, dense_bits=8)))
    entry = {key: vs32[key] for key in RATIOS}
    entry.update({f"{key}_vs_int8": vs8[key] for key in RATIOS})
    entry.update(macs=vs32["macs"], sd_layers=vs32["sd_layers"], layers=vs32["layers"],
                 sd_density=sum(l.sd.nonzeros for l in network.layers if l.sd)
                 / sum(l.sd.coeff_entries for l in network.layers if l.sd))
    return entry


def main(argv: list[str]) -> None:
    del argv
    results = {name: model_entry(name, _TABLE.value) for name in benchmarking.models(MODELS)}
    header = f"{'model':20s}{'MACs':>14s}{'C density':>10s}" + "".join(f"{k.replace('_ratio', ''):>24s}" for k in RATIOS)
    print(header)
    for name, entry in results.items():
        cells = "".join(f"{entry[k]:>11.2f}x /{entry[k + '_vs_int8']:>8.2f}x  " for k in RATIOS)
        print(f"{name:20s}{entry['macs']:>14,}{entry['sd_density']:>10.3f}{cells}")
    print("(each cell: dense fp32 / SD, then dense int8 / SD)")
    print("paper (headline, up to): " + ", ".join(f"{k} {v}x" for k, v in PAPER.items()))
    if benchmarking.JSON.value:
        print(json.dumps(dict(models=results, paper=PAPER, table=_TABLE.value)))


if __name__ == "__main__":
    app.run(main)
