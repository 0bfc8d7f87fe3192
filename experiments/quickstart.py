"""Quickstart, the main job: the paper's pipeline on Fashion-MNIST in about 12 minutes on 2 CPU cores.

    ./run_main.sh        (= python -m experiments.quickstart --workdir=runs/quickstart)

Two runs of the one trainer (`experiments/configs/quickstart.py`):
1. dense: train a dense CIFAR-style ResNet-20 on Fashion-MNIST (28x28x1), into WORKDIR/dense;
2. sd: decompose every kernel of the dense model into SD form (W = C·B, C sparse powers of two), then
   fine-tune it with the bucket-switch update of C (C stays powers of two throughout), into WORKDIR/sd.
Prints dense accuracy, SD accuracy, compression against 32-bit weights, density of C and the time of
each stage, and writes them to `summary.json` in the workdir (which, like each stage's, also holds
`config.json` and `run.json`). Each stage's config can be changed from the command line
(`--config.optim.epochs=1`, `--sd_config.optim.epochs=1`). Data: the Debian package
dataset-fashion-mnist (`run_main.sh` installs it where apt-get exists) prepared as the local TFDS
dataset `fashion_mnist_idx`; without it, TFDS's own `fashion_mnist` (needs internet and TensorFlow).
Rerunning with the same workdir resumes each stage from its checkpoints; a finished stage says so and
keeps its summary (its seconds too), so rerunning a finished quickstart prints the same summary.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py")


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


def run(dense: ml_collections.ConfigDict, sd: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train `dense` into workdir/dense, then `sd` from its checkpoints into workdir/sd (`sd`'s
    init.from_params is set to them); returns the summary written to `summary.json`."""
    from sd_jax.train import trainer
    from sd_jax.train import workdir as run_files

    root = run_files.as_path(workdir)
    dense, sd = _dataset_available(dense), _dataset_available(sd.copy_and_resolve_references())
    sd.init.from_params = os.fspath(root / "dense" / "checkpoints")
    run_files.describe_run(root, ml_collections.ConfigDict(dict(dense=dense.to_dict(), sd=sd.to_dict())))
    print("quickstart 1/2: dense training", file=sys.stderr)
    dense_summary = trainer.train_and_evaluate(dense, root / "dense")
    print("quickstart 2/2: decomposing the dense model into SD form, then fine-tuning it with the bucket switch",
          file=sys.stderr)
    sd_summary = trainer.train_and_evaluate(sd, root / "sd")
    seconds = dict(dense_training=dense_summary["seconds"], decompose_and_finetune=sd_summary["seconds"])
    seconds["total"] = sum(seconds.values())
    summary = dict(dense_accuracy=dense_summary["accuracy"], sd_accuracy=sd_summary["accuracy"],
                   compression_ratio=sd_summary["compression_ratio"], density=sd_summary["density"], seconds=seconds,
                   **{key: sd_summary[key] for key in ("dataset", "model", "setting", "recipe")})
    run_files.write_text(root / run_files.SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def _define_flags() -> None:
    """Flags exist only when this file runs as the program, so `run` can be imported anywhere."""
    flags.DEFINE_string("workdir", "runs/quickstart", "Where the two runs and summary.json go.")
    config_flags.DEFINE_config_file("config", f"{_CONFIG_FILE}:dense", "Config of the dense run.")
    config_flags.DEFINE_config_file("sd_config", f"{_CONFIG_FILE}:sd", "Config of the SD run (decompose, fine-tune).")


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every save at INFO
        logging.set_verbosity(logging.WARNING)
    workdir = flags.FLAGS.workdir
    summary = run(flags.FLAGS.config, flags.FLAGS.sd_config, workdir)
    rows = [("dense accuracy", f"{summary['dense_accuracy']:.4f}"), ("SD accuracy", f"{summary['sd_accuracy']:.4f}"),
            ("compression vs 32-bit", f"{summary['compression_ratio']:.2f}x"), ("density of C", f"{summary['density']:.3f}")]
    rows += [(f"seconds: {stage}", f"{value:.0f}") for stage, value in summary["seconds"].items()]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
    print(f"summary: {os.path.join(workdir, 'summary.json')}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
