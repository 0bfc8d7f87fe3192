"""Top-1 of a trained SD model, float and integer-only (`sd_jax.serve.integer`), on its full test set.

    python -m experiments.eval_integer --config=experiments/configs/quickstart.py:sd \\
        --params=runs/quickstart_i11/sd/checkpoints --output_dir=results/integer_quickstart

The config describes the run (model, SD options, dataset); `--params` is its checkpoint. The integer
model is calibrated on the first `--calibration` training images (in order, not augmented), then
both models classify every test image. Prints the two accuracies and writes `integer_eval.json`
(command, commit, checkpoint, figures, seconds; the dense twin's top-1 from `--dense_run`) to `--output_dir`,
which `experiments.tables` renders into RESULTS.md. ResNet-20 on 10,000 images: about
20 minutes on a 2-core CPU, almost all of it the integer convolutions (XLA's CPU integer
convolutions are about 8x slower than its float ones).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import benchmarking
from sd_jax.commands import inputs
from sd_jax.nn.rules import SDRules
from sd_jax.serve import integer
from sd_jax.train import workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (model, SD options, dataset).")
_PARAMS = flags.DEFINE_string("params", None, "The run's checkpoints directory or a parameter file.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write integer_eval.json.", required=True)
_CALIBRATION = flags.DEFINE_integer("calibration", 500, "Training images that set the activation ranges.")
BATCH = 250  # evaluation batch (--batch)
_DENSE_RUN = flags.DEFINE_string("dense_run", None, "The dense twin's run directory (its summary.json): its top-1 "
                                 "is recorded beside the SD figures.")


def _dense_top1(run: str | None) -> float | None:
    """Top-1 (%) of the dense run at `run` (its summary.json), or None without one."""
    if run is None:
        return None
    with open(os.path.join(run, "summary.json")) as stream:
        return 100 * json.load(stream)["accuracy"]


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    started = time.time()
    target = inputs.target_of(config)
    variables = inputs.read_variables(_PARAMS.value)
    model = target.build(SDRules.from_config(config) if inputs.is_sd(variables) else None)
    variables = inputs.arranged(variables, model, target, _PARAMS.value, required=None)
    integer_model = integer.quantize(model, variables, inputs.calibration_images(config, _CALIBRATION.value))
    float_logits = jax.jit(lambda x: model.apply(variables, x, train=False))
    integer_logits = jax.jit(integer_model.apply)
    correct, agree, count = np.zeros(2), 0, 0
    for batch in inputs.pipeline(config, "eval", benchmarking.batch(BATCH)):
        valid = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
        labels = np.asarray(batch["label"])[valid]
        predictions = [np.asarray(f(batch["image"])).argmax(-1)[valid] for f in (float_logits, integer_logits)]
        correct += [np.sum(p == labels) for p in predictions]
        agree += int(np.sum(predictions[0] == predictions[1]))
        count += int(valid.sum())
    figures = dict(dense_top1=_dense_top1(_DENSE_RUN.value), float_top1=100 * correct[0] / count, integer_top1=100 * correct[1] / count,
                   difference_points=100 * (correct[0] - correct[1]) / count, agreement=100 * agree / count,
                   test_images=count, calibration_images=_CALIBRATION.value)
    record = dict(command=workdir.command_line(), **workdir.git_commit(), checkpoint=_PARAMS.value, dense_run=_DENSE_RUN.value, model=target.name, dataset=config.input.dataset, **figures,
                  seconds=round(time.time() - started, 1), backend=jax.default_backend(), cpus=os.cpu_count())
    print(f"{target.name} on {config.input.dataset}: float SD top-1 {figures['float_top1']:.2f} %, "
          f"integer-only top-1 {figures['integer_top1']:.2f} % ({count} test images)")
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, "integer_eval.json"), "w") as stream:
        json.dump(record, stream, indent=1)


if __name__ == "__main__":
    app.run(main)
