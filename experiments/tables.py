"""Results tables: collect the `summary.json` files runs write and render them beside the paper.

    python -m experiments.tables --runs=runs [--output=RESULTS.md] [--plot=results.png]

Every `summary.json` below `--runs` counts: trainer runs (accuracy, compression_ratio, density,
seconds, dataset, model, setting) and quickstart runs (dense_accuracy, sd_accuracy, ...). A file that
is not valid JSON or lacks the figures is reported and skipped; the stage summaries inside a
quickstart run are left to the quickstart's own row. A run's `energy.json` (the analyzer's JSON
report of its final weights, `--mode=analyze --json --output=RUN/energy.json`) adds its energy ratios
and, for SD runs, gives the compression and density columns (the same count as the trainer's summary).
The markdown starts with `NOTES.md` of the `--runs` folder when there is one, has one row per run,
the commands recorded in each run's `command.txt`, and the paper's headline claims beneath; the plot
shows accuracy against compression. No figure is typed by hand.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Any

from absl import app, flags

from experiments.configs.paper import SETTINGS
from sd_jax.train import checkpoint

PAPER_CLAIMS = (
    "SD inference: up to 2.44x energy efficiency (authors' hardware)",
    "SD training: 10.56x lower storage and 4.48x lower training energy, negligible accuracy loss",
    "SmartExchange hardware: up to 6.7x energy efficiency and 19.2x speed-up over four accelerators",
)

ENERGY_FILE = "energy.json"
PREAMBLE_FILE = "NOTES.md"


def collect(root: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows from every readable summary.json under `root`, and one message per skipped file."""
    rows, skipped = [], []
    paths = sorted(glob.glob(os.path.join(root, "**", "summary.json"), recursive=True))
    quickstarts = [os.path.dirname(p) for p in paths if '"sd_accuracy"' in _text(p)]
    for path in paths:
        if any(path.startswith(run + os.sep) and os.path.dirname(path) != run for run in quickstarts):
            continue  # a stage of a quickstart run: its figures are in the quickstart's own row
        try:
            with open(path) as stream:
                summary = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            skipped.append(f"{path}: not readable JSON ({error}); skipped")
            continue
        row = _row(path, summary)
        if row is None:
            skipped.append(f"{path}: has neither accuracy nor sd_accuracy; skipped")
            continue
        row["energy"], message = _energy(row["run"])
        skipped.extend([message] if message else [])
        if row["energy"] and row["energy"].get("sd_density") is not None:
            # the analyzer's count of the final weights: runs whose trainer predates its storage fix
            # (latent C counted unquantized, padding in the dense side) wrote other figures
            row.update(compression=row["energy"]["storage_ratio"], density=row["energy"]["sd_density"])
        rows.append(row)
    return rows, skipped


def _text(path: str) -> str:
    try:
        with open(path) as stream:
            return stream.read()
    except OSError:
        return ""


def _row(path: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    run = os.path.dirname(path)
    command = _text(os.path.join(run, "command.txt")).strip()
    if "sd_accuracy" in summary:  # a quickstart: dense and SD in one summary
        return dict(run=run, dataset="fashion_mnist", model="resnet20 (quickstart)", setting="dense -> SD",
                    dense_accuracy=summary["dense_accuracy"], accuracy=summary["sd_accuracy"],
                    compression=summary["compression_ratio"], density=summary["density"],
                    seconds=summary["seconds"]["total"], epochs=None, machine="", command=command)
    if "accuracy" not in summary:
        return None
    setting = _config_setting(command) or ("SD " if summary.get("sd") else "dense ") + summary.get("setting", "")
    machine = f"{summary.get('backend', '?')} x{summary.get('devices', '?')}" + (
        f", {summary['cpus']} CPU cores" if "cpus" in summary else "")
    return dict(run=run, dataset=summary.get("dataset", "?"), model=summary.get("model", "?"),
                setting=setting,
                dense_accuracy=None, accuracy=summary["accuracy"], compression=summary.get("compression_ratio", 1.0),
                density=summary.get("density", 1.0), seconds=summary.get("seconds", 0.0),
                epochs=summary.get("epochs"), machine=machine, command=command)


def _config_setting(command: str) -> str | None:
    """The experiment setting named in a recorded command's config argument, e.g. 'sd_8bit' in
    `--config=experiments/configs/paper.py:cifar10_jpeg,resnet20,sd_8bit`."""
    match = re.search(r"--config=\S+\.py:(\S+)", command)
    last = match.group(1).split(",")[-1] if match else None
    return last if last in SETTINGS else None


def _energy(run: str) -> tuple[dict[str, Any] | None, str | None]:
    """The summary of `run/energy.json` (written by `--mode=analyze --json --output=...`), or a message."""
    path = os.path.join(run, ENERGY_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as stream:
            return json.load(stream)["summary"], None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        return None, f"{path}: not an analyzer JSON report ({type(error).__name__}: {error}); energy left out"


def markdown(rows: list[dict[str, Any]], preamble: str = "") -> str:
    """Optional preamble, a paper-style table of our runs, the commands, then the paper's headline claims."""
    lines = ([preamble.rstrip(), ""] if preamble else []) + [
        "| dataset | model | setting | dense acc. | acc. | compression vs 32-bit | density of C | "
        "inference energy fp32/SD | training energy fp32/SD | epochs | wall s | machine | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = "" if r["dense_accuracy"] is None else f"{100 * r['dense_accuracy']:.2f}"
        energy = r.get("energy") or {}
        ratio = lambda key: f"{energy[key]:.2f}x" if key in energy else ""
        lines.append(f"| {r['dataset']} | {r['model']} | {r['setting']} | {dense} | {100 * r['accuracy']:.2f} | "
                     f"{r['compression']:.2f}x | {r['density']:.3f} | {ratio('inference_energy_ratio')} | "
                     f"{ratio('training_energy_ratio')} | {r['epochs'] or ''} | {r['seconds']:.0f} | {r['machine']} | "
                     f"`{os.path.basename(r['run'])}` |")
    commands = [f"`{os.path.basename(r['run'])}`:\n```\n{r['command']}\n```" for r in rows if r["command"]]
    return "\n".join(lines + ([""] + ["Commands:", ""] + commands if commands else [])
                     + ["", "The paper's headline claims, for comparison:"] + [f"- {c}" for c in PAPER_CLAIMS])


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against compression, one point per run (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for r in rows:
        axes.scatter(r["compression"], 100 * r["accuracy"])
        axes.annotate(f"{r['dataset']} {r['model']} {r['setting']}", (r["compression"], 100 * r["accuracy"]),
                      fontsize=6)
    axes.set_xlabel("weight storage compression against 32-bit (x)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_xscale("log")
    axes.set_xlim(right=max(r["compression"] for r in rows) * 4)  # room for the labels
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _define_flags() -> None:
    """Flags exist only when this file runs as the program, so its functions import anywhere."""
    flags.DEFINE_string("runs", "runs", "Directory searched (recursively) for summary.json files.")
    flags.DEFINE_string("output", None, "Write the markdown here (default: print it).")
    flags.DEFINE_string("plot", None, "Write the accuracy-against-compression plot (PNG) here.")


def main(argv: list[str]) -> None:
    del argv
    options = flags.FLAGS
    rows, skipped = collect(options.runs)
    for message in skipped:
        print(message, file=sys.stderr)
    text = markdown(rows, _text(os.path.join(options.runs, PREAMBLE_FILE)))
    if options.output:
        checkpoint.atomic_write_text(options.output, text + "\n")
    else:
        print(text)
    if options.plot and rows:
        plot(rows, options.plot)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
