"""Quickstart, the main job: the paper's pipeline on Fashion-MNIST in about 12 minutes on 2 CPU cores.

    ./run_main.sh        (= python -m experiments.quickstart --workdir=runs/quickstart)

1. Train a dense CIFAR-style ResNet-20 on Fashion-MNIST (28x28x1).
2. Decompose every kernel into SD form (W = C·B, C sparse powers of two).
3. Fine-tune the SD network with the bucket-switch update of C (C stays powers of two throughout).
Prints dense accuracy, SD accuracy, compression against 32-bit weights, density of C and the time of
each stage, and writes them to `summary.json` in the workdir. Data: the Debian package
dataset-fashion-mnist (`run_main.sh` installs it where apt-get exists) prepared as the local TFDS
dataset `fashion_mnist_idx`; without it, TFDS's own `fashion_mnist` (needs internet and TensorFlow).
Rerunning with the same workdir resumes each stage from its checkpoints.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs.quickstart import sd_stage



def _dataset_available(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Prefer the offline copy; prepare it from the Debian files when they are there."""
    from sd_jax import data

    if config.input.dataset == "fashion_mnist_idx":
        try:
            data.prepare("fashion_mnist_idx", config.input.data_dir or None)
        except data.SourceNotFoundError:
            print("Debian package dataset-fashion-mnist not found; using TFDS 'fashion_mnist' (needs internet)")
            config.input.dataset = "fashion_mnist"
    return config


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """All three stages; returns the summary written to `summary.json`."""
    from sd_jax.train import trainer

    config = _dataset_available(config)
    seconds = {}
    start = time.perf_counter()
    dense = trainer.train_and_evaluate(config, os.path.join(workdir, "dense"))
    seconds["dense_training"] = time.perf_counter() - start
    start = time.perf_counter()
    sd = trainer.train_and_evaluate(sd_stage(config, os.path.join(workdir, "dense")), os.path.join(workdir, "sd"))
    seconds["decompose_and_finetune"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    summary = dict(dense_accuracy=dense["accuracy"], sd_accuracy=sd["accuracy"],
                   compression_ratio=sd["compression_ratio"], density=sd["density"], seconds=seconds)
    with open(os.path.join(workdir, "summary.json"), "w") as stream:
        json.dump(summary, stream, indent=1)
    return summary


def _define_flags() -> None:
    """Flags exist only when this file runs as the program, so `run` can be imported anywhere."""
    flags.DEFINE_string("workdir", "runs/quickstart", "Where checkpoints, metrics and summary.json go.")
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py"), "Config file.")


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every save at INFO
        logging.set_verbosity(logging.WARNING)
    workdir = flags.FLAGS.workdir
    summary = run(flags.FLAGS.config, workdir)
    rows = [("dense accuracy", f"{summary['dense_accuracy']:.4f}"), ("SD accuracy", f"{summary['sd_accuracy']:.4f}"),
            ("compression vs 32-bit", f"{summary['compression_ratio']:.2f}x"), ("density of C", f"{summary['density']:.3f}")]
    rows += [(f"seconds: {stage}", f"{value:.0f}") for stage, value in summary["seconds"].items()]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
    print(f"summary: {os.path.join(workdir, 'summary.json')}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
