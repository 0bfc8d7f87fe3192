"""Results tables: collect the `summary.json` files runs write and render them beside the paper.

    python -m experiments.tables --runs=runs [--output=RESULTS.md] [--plot=results.png]
    python -m experiments.tables --runs=runs --json   # one JSON object: {"rows": [...]}

Every `summary.json` below `--runs` counts: trainer runs (accuracy, best_accuracy, compression_ratio,
density, seconds, dataset, model, setting, recipe, stored_activation_bits, peak_memory_ratio; bits_per_char
for text runs) and quickstart runs (dense_accuracy, sd_accuracy,
...). A file that is not valid JSON or lacks the figures is reported and skipped; the stage summaries
inside a quickstart run are left to the quickstart's own row. A run describes itself (the trainer and
the quickstart write `config.json` and `run.json`, `sd_jax.train.workdir`): its command is the last
start's command line in `run.json`, with its commit; its setting is the one its summary records, else
its `config.json`'s. Runs from before that keep a hand-written `command.txt`: its text is the
command, and the setting named in its config argument stands in for a summary that recorded only the
data split ("plain"). A run's `energy.json` (the analyzer's JSON report of its final
weights, `--mode=analyze --json --output=RUN/energy.json`) adds its energy ratios against dense
float32 and against dense 8-bit and, for SD runs, gives the compression and density columns (the
same count as the trainer's summary). Each row holds ROW_KEYS, None where the run does not say.
The markdown starts with `NOTES.md` of the `--runs` folder when there is one, has one row per run,
the command of each run, the integer-only inference records (`integer_eval.json`, written by
`experiments/eval_integer.py`) and the paper's headline claims beneath; the plot
shows accuracy against compression. No figure is typed by hand.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags

from experiments.configs.paper import SETTINGS
from sd_jax import io as sd_io
from sd_jax.train import workdir

PAPER_CLAIMS = (
    "SD inference: up to 2.44x energy efficiency (authors' hardware)",
    "SD training: 10.56x lower storage and 4.48x lower training energy, negligible accuracy loss",
    "SmartExchange hardware: up to 6.7x energy efficiency and 19.2x speed-up over four accelerators",
)

ENERGY_FILE = "energy.json"
INTEGER_FILE = "integer_eval.json"  # what experiments/eval_integer.py writes
LEGACY_COMMAND_FILE = "command.txt"  # what runs from before run.json kept by hand
PREAMBLE_FILE = "NOTES.md"
ENERGY_RATIOS = ("inference_energy_ratio", "training_energy_ratio", "inference_energy_ratio_vs_int8",
                 "training_energy_ratio_vs_int8")
# The stored activations of a trainer run and its train step's peak memory against exact (summary.json).
MEMORY_KEYS = ("stored_activation_bits", "peak_memory_ratio")
# What `--json` gives of each row, in this order; the markdown also shows dense_accuracy, machine, command.
ROW_KEYS = ("dataset", "model", "setting", "recipe", "epochs", "accuracy", "best_accuracy", "bits_per_char",
            "compression_ratio", "density", *ENERGY_RATIOS, *MEMORY_KEYS, "seconds", "run")


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
        energy, message = _energy(row["run"])
        skipped.extend([message] if message else [])
        row.update({key: (energy or {}).get(key) for key in ENERGY_RATIOS})
        if energy and energy.get("sd_density") is not None:
            # the analyzer's count of the final weights: runs whose trainer predates its storage fix
            # (latent C counted unquantized, padding in the dense side) wrote other figures
            row.update(compression_ratio=energy["storage_ratio"], density=energy["sd_density"])
        rows.append(row)
    return rows, skipped


def _text(path: str) -> str:
    try:
        with open(path) as stream:
            return stream.read()
    except OSError:
        return ""


def _row(path: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    """A row without its energy ratios (see `collect`), or None for a summary without accuracy."""
    run = os.path.dirname(path)
    command, config = _command(run), _config(run)
    if "sd_accuracy" in summary:  # a quickstart: a dense model trained, decomposed and fine-tuned in SD form
        return dict(run=run, dataset=summary.get("dataset", "fashion_mnist"), model=summary.get("model", "resnet20"),
                    setting=summary.get("setting", "inference_only"), recipe=summary.get("recipe"), epochs=None,
                    dense_accuracy=summary["dense_accuracy"], accuracy=summary["sd_accuracy"], best_accuracy=None,
                    bits_per_char=None, compression_ratio=summary["compression_ratio"], density=summary["density"],
                    **dict.fromkeys(MEMORY_KEYS),
                    seconds=summary["seconds"]["total"], machine="", command=command)
    if "accuracy" not in summary:
        return None
    machine = f"{summary['backend']} x{summary.get('devices', '?')}" if "backend" in summary else ""
    machine += f", {summary['cpus']} CPU cores" if machine and "cpus" in summary else ""
    return dict(run=run, dataset=summary.get("dataset"), model=summary.get("model"),
                setting=_setting(summary, config, command), recipe=summary.get("recipe"), epochs=summary.get("epochs"),
                dense_accuracy=None, accuracy=summary["accuracy"], best_accuracy=summary.get("best_accuracy"),
                bits_per_char=summary.get("bits_per_char"),
                compression_ratio=summary.get("compression_ratio"), density=summary.get("density"),
                **{key: summary.get(key) for key in MEMORY_KEYS},
                seconds=summary.get("seconds"), machine=machine, command=command)


def _command(run: str) -> str:
    """The command of the run's last start in its `run.json`, with the commit it ran at; for runs from
    before `run.json`, the text of their hand-written `command.txt`; "" when there is neither."""
    starts = _json(os.path.join(run, workdir.RUN_FILE)).get("starts")
    if not starts:
        return _text(os.path.join(run, LEGACY_COMMAND_FILE)).strip()
    last = starts[-1]
    changes = ", with uncommitted changes" if last.get("dirty") else ""
    return f"{last['command']}   # at commit {last.get('commit', workdir.UNKNOWN_COMMIT)}{changes}"


def _config(run: str) -> dict[str, Any]:
    """The run's `config.json` ({} when it has none)."""
    return _json(os.path.join(run, workdir.CONFIG_FILE))


def _json(path: str) -> dict[str, Any]:
    """The JSON object at `path`; {} when the file is missing or broken."""
    try:
        return dict(workdir.read_json(path))
    except (OSError, ValueError, TypeError):
        return {}


def _setting(summary: dict[str, Any], config: dict[str, Any], command: str) -> str | None:
    """The experiment setting the run recorded in its summary, else in its config, else the one its
    command names (runs from before config.json that recorded only the data split, "plain"), else None."""
    for recorded in (summary.get("setting"), config.get("setting"), config.get("input", {}).get("setting")):
        if isinstance(recorded, str) and recorded not in ("", "plain"):
            return recorded
    return _config_setting(command)


def _config_setting(command: str) -> str | None:
    """The experiment setting named in a recorded command's config argument, e.g. 'sd_8bit' in
    `--config=experiments/configs/paper.py:cifar10_jpeg,resnet20,sd_8bit[,tuned]`."""
    match = re.search(r"--config=\S+\.py:(\S+)", command)
    named = [part for part in match.group(1).split(",") if part in SETTINGS] if match else []
    return named[-1] if named else None


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


_percent, _times = (lambda value: f"{100 * value:.2f}"), (lambda value: f"{value:.2f}x")
_COLUMNS = (  # header, row key, text of a known value
    ("dataset", "dataset", str), ("model", "model", str), ("setting", "setting", str), ("recipe", "recipe", str),
    ("dense acc.", "dense_accuracy", _percent), ("acc.", "accuracy", _percent), ("best acc.", "best_accuracy", _percent),
    ("bits per char", "bits_per_char", lambda value: f"{value:.3f}"),
    ("compression vs 32-bit", "compression_ratio", _times), ("density of C", "density", lambda value: f"{value:.3f}"),
    ("inference energy: dense fp32 / SD", "inference_energy_ratio", _times),
    ("inference energy: dense 8-bit / SD", "inference_energy_ratio_vs_int8", _times),
    ("training energy: dense fp32 / SD", "training_energy_ratio", _times),
    ("training energy: dense 8-bit / SD", "training_energy_ratio_vs_int8", _times),
    ("stored activations, bits", "stored_activation_bits", str),
    ("train step peak memory / exact", "peak_memory_ratio", lambda value: f"{value:.3f}"),
    ("epochs", "epochs", str), ("wall s", "seconds", lambda value: f"{value:.0f}"), ("machine", "machine", str),
)
NOT_ANALYZED = "n/a"  # an energy.json written before the dense 8-bit baseline


def collect_integer(root: str) -> list[dict[str, Any]]:
    """The records of every `integer_eval.json` under `root` (integer-only against float SD top-1), with
    their `run` (the folder)."""
    paths = sorted(glob.glob(os.path.join(root, "**", INTEGER_FILE), recursive=True))
    return [dict(_json(path), run=os.path.dirname(path)) for path in paths]


def _integer_section(records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the integer-only inference table and its commands; none without records."""
    if not records:
        return []
    percent = lambda value: "" if value is None else f"{value:.2f}"
    lines = ["", "## Integer-only SD inference", "",
             "Top-1 (%) on the full test split of the dense run, the float SD model and its integer-only form "
             "(`sd_jax.serve.integer`: uint8 activations, int8 B rebuilt by shifts and adds, int8 MACs, int32 "
             "accumulators), and how often the two SD forms agree.", "",
             "| dataset | model | dense | float SD | integer-only | float - integer | agreement | test images | run |",
             "|" + "---|" * 9]
    lines += [f"| {r['dataset']} | {r['model']} | {percent(r.get('dense_top1'))} | {percent(r['float_top1'])} | "
              f"{percent(r['integer_top1'])} | {r['difference_points']:.2f} | {percent(r['agreement'])} | "
              f"{r['test_images']} | `{os.path.basename(r['run'])}` |" for r in records]
    return lines + [""] + [f"`{os.path.basename(r['run'])}`:\n```\n{r['command']}\n```" for r in records]


def _cells(row: dict[str, Any]) -> list[str]:
    def cell(key: str, text: Callable[[Any], str]) -> str:
        if row[key] is not None:
            return text(row[key])
        vs_fp32 = key.removesuffix("_vs_int8")
        return NOT_ANALYZED if key != vs_fp32 and row[vs_fp32] is not None else ""
    return [cell(key, text) for _, key, text in _COLUMNS] + [f"`{os.path.basename(row['run'])}`"]


def markdown(rows: list[dict[str, Any]], preamble: str = "", integer: list[dict[str, Any]] = ()) -> str:
    """Optional preamble, a paper-style table of our runs, the commands, the integer-only inference
    records (`collect_integer`) when given, then the paper's headline claims."""
    headers = [header for header, _, _ in _COLUMNS] + ["run"]
    lines = ([preamble.rstrip(), ""] if preamble else []) + [
        "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    if any(NOT_ANALYZED in _cells(r) for r in rows):
        lines += ["", f"{NOT_ANALYZED}: the run's `{ENERGY_FILE}` predates the dense 8-bit baseline; rerun the "
                  "analyze command in its `command.txt` (it needs the run's checkpoints) to fill it."]
    commands = [f"`{os.path.basename(r['run'])}`:\n```\n{r['command']}\n```" for r in rows if r["command"]]
    return "\n".join(lines + ([""] + ["Commands:", ""] + commands if commands else []) + _integer_section(list(integer))
                     + ["", "The paper's headline claims, for comparison:"] + [f"- {c}" for c in PAPER_CLAIMS])


def to_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON object {"rows": [...]}, each row with exactly ROW_KEYS."""
    return json.dumps(dict(rows=[{key: row[key] for key in ROW_KEYS} for row in rows]))


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against compression, one point per run that has both (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["compression_ratio"] is not None]
    figure, axes = plt.subplots(figsize=(8, 5))
    for r in rows:
        axes.scatter(r["compression_ratio"], 100 * r["accuracy"])
        axes.annotate(f"{r['dataset']} {r['model']} {r['setting']} ({os.path.basename(r['run'])})",
                      (r["compression_ratio"], 100 * r["accuracy"]), fontsize=6)
    axes.set_xlabel("weight storage compression against 32-bit (x)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_xscale("log")
    if rows:
        axes.set_xlim(right=max(r["compression_ratio"] for r in rows) * 4)  # room for the labels
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _define_flags() -> None:
    """Flags exist only when this file runs as the program, so its functions import anywhere."""
    flags.DEFINE_string("runs", "runs", "Directory searched (recursively) for summary.json files.")
    flags.DEFINE_string("output", None, "Write the markdown (or the JSON) here (default: print it).")
    flags.DEFINE_bool("json", False, "Give the rows as one JSON object instead of the markdown.")
    flags.DEFINE_string("plot", None, "Write the accuracy-against-compression plot (PNG) here.")


def main(argv: list[str]) -> None:
    del argv
    options = flags.FLAGS
    rows, skipped = collect(options.runs)
    for message in skipped:
        print(message, file=sys.stderr)
    text = to_json(rows) if options.json else markdown(rows, _text(os.path.join(options.runs, PREAMBLE_FILE)),
                                                       collect_integer(options.runs))
    if options.output:
        sd_io.atomic_write_text(options.output, text + "\n")
    else:
        print(text)
    if options.plot and rows:
        plot(rows, options.plot)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
