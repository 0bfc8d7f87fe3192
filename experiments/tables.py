"""Results tables: collect the `summary.json` files runs write and render them beside the paper.

    python -m experiments.tables --runs=runs [--output=RESULTS.md] [--plot=results.png]

Every `summary.json` below `--runs` counts: trainer runs (accuracy, compression_ratio, density,
seconds, dataset, model, setting) and quickstart runs (dense_accuracy, sd_accuracy, ...). A file that
is not valid JSON or lacks the figures is reported and skipped; the stage summaries inside a
quickstart run are left to the quickstart's own row. The markdown has one row per run,
with the command line recorded in the run's `command.txt` when present, and the paper's headline
claims beneath; the plot shows accuracy against compression. No figure is typed by hand.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

from absl import app, flags

PAPER_CLAIMS = (
    "SD inference: up to 2.44x energy efficiency (authors' hardware)",
    "SD training: 10.56x lower storage and 4.48x lower training energy, negligible accuracy loss",
    "SmartExchange hardware: up to 6.7x energy efficiency and 19.2x speed-up over four accelerators",
)



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
        else:
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
    command_file = os.path.join(run, "command.txt")
    command = open(command_file).read().strip() if os.path.exists(command_file) else ""
    if "sd_accuracy" in summary:  # a quickstart: dense and SD in one summary
        return dict(run=run, dataset="fashion_mnist", model="resnet20 (quickstart)", setting="dense -> SD",
                    dense_accuracy=summary["dense_accuracy"], accuracy=summary["sd_accuracy"],
                    compression=summary["compression_ratio"], density=summary["density"],
                    seconds=summary["seconds"]["total"], command=command)
    if "accuracy" not in summary:
        return None
    return dict(run=run, dataset=summary.get("dataset", "?"), model=summary.get("model", "?"),
                setting=("SD " if summary.get("sd") else "dense ") + summary.get("setting", ""),
                dense_accuracy=None, accuracy=summary["accuracy"], compression=summary.get("compression_ratio", 1.0),
                density=summary.get("density", 1.0), seconds=summary.get("seconds", 0.0), command=command)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Paper-style table of our runs, then the paper's headline claims."""
    lines = ["| dataset | model | setting | dense acc. | acc. | compression vs 32-bit | density of C | wall s | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = "" if r["dense_accuracy"] is None else f"{100 * r['dense_accuracy']:.2f}"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['setting']} | {dense} | {100 * r['accuracy']:.2f} | "
                     f"{r['compression']:.2f}x | {r['density']:.3f} | {r['seconds']:.0f} | `{r['run']}` |")
    commands = [f"- `{r['run']}`: `{r['command']}`" for r in rows if r["command"]]
    return "\n".join(lines + ([""] + ["Commands:"] + commands if commands else [])
                     + ["", "The paper's headline claims, for comparison:"] + [f"- {c}" for c in PAPER_CLAIMS])


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against compression, one point per run (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in rows:
        axes.scatter(r["compression"], 100 * r["accuracy"])
        axes.annotate(f"{r['model']} {r['setting']}", (r["compression"], 100 * r["accuracy"]), fontsize=7)
    axes.set_xlabel("weight storage compression against 32-bit (x)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_xscale("log")
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
    text = markdown(rows)
    if options.output:
        with open(options.output, "w") as stream:
            stream.write(text + "\n")
    else:
        print(text)
    if options.plot and rows:
        plot(rows, options.plot)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
