"""Dense against SD, side by side: analysis of one network, its report formats and plots.

`analyze` evaluates the dense view of a network on one hardware description, its SD view on
another (usually the same technology at other bit widths) and, optionally, the dense view again on a
dense 8-bit baseline (8-bit weights, activations and gradients: the class of baseline the paper's
training claims are measured against) and integer-only SD inference (`sd_jax.cost.integer.IntegerView`:
int8 MACs, the rebuild's shifts and adds, requantizations and, where the table prices them, their
energy with its data movement); `summary`, `layer_rows` and the `format_*` / `to_*`
functions render the result; `plot_energy` and `plot_storage` save PNGs. Storage totals add the
model's other parameters (biases, norms) at 32 bits to every side. Reports give both MAC counts:
`macs` as FLOP counters count them (padding taps included) and `effective_macs` (without them), and
name the one the energy figures charge (`energy_macs`, see `sd_jax.cost.energy`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any

import jax
import numpy as np

from sd_jax.cost import energy as energy_lib
from sd_jax.cost import integer as integer_lib
from sd_jax.cost.hardware import Hardware
from sd_jax.cost.layers import Network

OTHER_PARAM_BITS = 32
PHASES = ("forward", "backward_activations", "backward_weights", "update")


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Per-layer energies (NumPy) of the dense and SD views, and of the dense 8-bit baseline when
    analyzed (`dense_int8`, else None); inference and training at their batches. `integer`: the
    integer-only SD inference view when analyzed."""

    model: str
    unit: str
    network: Network
    dense: dict[str, Any]
    sd: dict[str, Any]
    steps_per_epoch: int
    dense_int8: dict[str, Any] | None = None
    integer: integer_lib.IntegerView | None = None


def analyze(
    network: Network, model: str, *, unit: str, dense_hardware: Hardware, sd_hardware: Hardware,
    int8_hardware: Hardware | None = None, inference_batch: int = 1, training_batch: int = 128,
    steps_per_epoch: int = 1, integer: integer_lib.IntegerView | None = None,
) -> Analysis:
    """Run `energy` on the dense view (on `dense_hardware`, and on `int8_hardware` when given) and the
    SD view (on `sd_hardware`): inference at `inference_batch`, training at `training_batch`; `integer`
    (`integer_lib.integer_view` of `network`) joins the reports as it is."""
    for name, value in (("inference_batch", inference_batch), ("training_batch", training_batch),
                        ("steps_per_epoch", steps_per_epoch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"analyze: {name}={value!r} must be a positive integer")

    def run(counts: energy_lib.Counts, hw: Hardware) -> dict[str, Any]:
        inference = energy_lib.energy(counts, dataclasses.replace(hw, batch=np.float32(inference_batch)))
        training = energy_lib.energy(counts, dataclasses.replace(hw, batch=np.float32(training_batch)))
        return jax.device_get(dict(inference=inference["inference"], training=training["training"],
                                   storage=training["storage"]))

    dense_counts = energy_lib.layer_counts(network, sd=False)
    return Analysis(model, unit, network, run(dense_counts, dense_hardware),
                    run(energy_lib.layer_counts(network), sd_hardware), steps_per_epoch,
                    None if int8_hardware is None else run(dense_counts, int8_hardware), integer)


def _ratio(dense: float, sd: float) -> float:
    return dense / sd if sd else math.inf


def _side_totals(result: dict[str, Any], other_bits: float) -> dict[str, float]:
    inference = float(energy_lib.total(result["inference"]))
    training = float(energy_lib.training_total(result))
    return dict(
        inference_energy=inference, storage_bits=float(np.sum(result["storage"]["weights"])) + other_bits,
        training_energy=training,
        training_storage_bits=float(energy_lib.total(result["storage"])) + 3 * other_bits,  # value, grad, state
    )


# ratio name -> the total it divides
RATIOS = dict(inference_energy="inference_energy", storage="storage_bits", training_energy="training_energy",
              training_storage="training_storage_bits")


def summary(analysis: Analysis) -> dict[str, Any]:
    """Totals of every view and their ratios, energies in `unit`, storage in bits: `<total>_ratio` is
    dense / SD, `<total>_ratio_vs_int8` dense 8-bit / SD (when the analysis has that baseline).
    MACs per image: `macs` (padding taps included), `effective_macs` (excluded) and `energy_macs`,
    the name of the count the energies charge. With an integer view, `integer_*` (`_integer_totals`)."""
    other_bits = analysis.network.other_params * OTHER_PARAM_BITS
    views = dict(dense=analysis.dense, sd=analysis.sd, dense_int8=analysis.dense_int8)
    totals = {view: _side_totals(result, other_bits) for view, result in views.items() if result is not None}
    layers = analysis.network.layers
    out: dict[str, Any] = dict(model=analysis.model, unit=analysis.unit,
                               macs=sum(layer.macs for layer in layers),
                               effective_macs=sum(layer.effective_macs for layer in layers),
                               energy_macs=energy_lib.ENERGY_MACS,
                               layers=len(analysis.network.layers),
                               sd_layers=sum(layer.sd is not None for layer in analysis.network.layers),
                               sd_density=_density(analysis.network),
                               steps_per_epoch=analysis.steps_per_epoch)
    for view, view_totals in totals.items():
        out.update({f"{view}_{key}": value for key, value in view_totals.items()})
        out[f"{view}_training_energy_per_epoch"] = view_totals["training_energy"] * analysis.steps_per_epoch
    sd = totals["sd"]
    for name, key in RATIOS.items():
        out[f"{name}_ratio"] = _ratio(totals["dense"][key], sd[key])
        if "dense_int8" in totals:
            out[f"{name}_ratio_vs_int8"] = _ratio(totals["dense_int8"][key], sd[key])
    if analysis.integer is not None:
        out.update(_integer_totals(analysis.integer, {view: t["inference_energy"] for view, t in totals.items()}))
    return out


def _integer_totals(view: integer_lib.IntegerView, inference: dict[str, float]) -> dict[str, Any]:
    """Integer-only SD inference per image: operation counts, energy (None when the table does not price
    it; `integer_unpriced` lists the missing entries) and `integer_inference_energy_ratio[_vs_int8]`, dense
    (8-bit) inference energy / integer."""
    count = lambda *columns: int(round(sum(float(np.sum(column, dtype=np.float64)) for column in columns)))
    ops = view.ops
    out: dict[str, Any] = dict(
        integer_table=view.table, integer_int8_macs=count(ops.int8_macs),
        integer_rebuild_shifts=count(ops.rebuild_shifts), integer_rebuild_adds=count(ops.rebuild_adds),
        integer_requantizations=count(ops.weight_requantizations, ops.output_requantizations),
        integer_unpriced=list(view.missing))
    energy = None if view.energy is None else float(energy_lib.total(view.energy))
    out["integer_inference_energy"] = energy
    for suffix, baseline in (("", "dense"), ("_vs_int8", "dense_int8")):
        if baseline in inference:
            ratio = None if energy is None else _ratio(inference[baseline], energy)
            out[f"integer_inference_energy_ratio{suffix}"] = ratio
    return out


def _density(network: Network) -> float | None:
    """Non-zeros over entries of C across the SD kernels; None without any."""
    stats = [layer.sd for layer in network.layers if layer.sd is not None]
    entries = sum(stat.coeff_entries for stat in stats)
    return sum(stat.nonzeros for stat in stats) / entries if entries else None


def layer_rows(analysis: Analysis) -> list[dict[str, Any]]:
    """One row per layer: shapes, MACs (with and without padding taps), SD statistics, storage and
    energies of both views; the integer path's rebuild adds, requantizations and inference energy (None
    without an integer view or where the table does not price it)."""
    integer = analysis.integer
    rows = []
    for i, layer in enumerate(analysis.network.layers):
        pick = lambda tree: float(tree[i])
        train = lambda result: sum(pick(part) for phase in result["training"].values() for part in phase.values())
        rows.append(dict(
            layer=layer.name, kind=layer.kind, kernel="x".join(map(str, layer.kernel_shape)), macs=layer.macs,
            effective_macs=layer.effective_macs,
            density=layer.sd.density if layer.sd else None, code_bits=layer.sd.code_bits if layer.sd else None,
            dense_storage_bits=pick(analysis.dense["storage"]["weights"]),
            sd_storage_bits=pick(analysis.sd["storage"]["weights"]),
            dense_inference_energy=sum(pick(v) for v in analysis.dense["inference"].values()),
            sd_inference_energy=sum(pick(v) for v in analysis.sd["inference"].values()),
            dense_training_energy=train(analysis.dense), sd_training_energy=train(analysis.sd),
            rebuild_adds=None if integer is None else pick(integer.ops.rebuild_adds),
            requantizations=None if integer is None else
            pick(integer.ops.weight_requantizations) + pick(integer.ops.output_requantizations),
            integer_inference_energy=None if integer is None or integer.energy is None else
            sum(pick(v) for v in integer.energy.values()),
        ))
    return rows


_COLUMNS = ("layer", "kind", "kernel", "macs", "effective_macs", "density", "code_bits", "dense_storage_bits",
            "sd_storage_bits", "dense_inference_energy", "sd_inference_energy", "dense_training_energy",
            "sd_training_energy", "rebuild_adds", "requantizations", "integer_inference_energy")
_HEADERS = ("layer", "kind", "kernel", "MACs", "effective MACs", "density", "code bits", "dense bits",
            "SD bits", "dense inf.", "SD inf.", "dense train", "SD train", "rebuild adds", "requant.", "int inf.")


def _cells(row: dict[str, Any]) -> list[str]:
    def cell(key: str) -> str:
        value = row[key]
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        if key == "density":
            return f"{value:.3f}"
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    return [cell(key) for key in _COLUMNS]


# label, total, ratio, whether the total is an energy (in `unit`) rather than bits
_TOTAL_LINES = (
    ("inference energy / image", "inference_energy", "inference_energy", True),
    ("storage (bits)", "storage_bits", "storage", False),
    ("training energy / step", "training_energy", "training_energy", True),
    ("training energy / epoch", "training_energy_per_epoch", "training_energy", True),
    ("training storage / step (bits)", "training_storage_bits", "training_storage", False),
)


def _totals_table(analysis: Analysis) -> list[list[str]]:
    """Header and one row per total: each view's value, then dense / SD and dense 8-bit / SD."""
    s = summary(analysis)
    int8 = analysis.dense_int8 is not None
    views = {"dense": "dense", **({"dense 8-bit": "dense_int8"} if int8 else {}), "SD": "sd"}
    ratios = {"dense / SD": "", **({"dense 8-bit / SD": "_vs_int8"} if int8 else {})}
    rows = [["total", *views, *ratios]]
    for label, total, ratio, is_energy in _TOTAL_LINES:
        unit = f" {s['unit']}" if is_energy else ""
        rows.append([label, *(f"{s[f'{view}_{total}']:.4g}{unit}" for view in views.values()),
                     *(f"{s[f'{ratio}_ratio{suffix}']:.2f}x" for suffix in ratios.values())])
    return rows


def _headline(analysis: Analysis) -> str:
    """One sentence: both MAC counts, the one the energies charge, and how many layers are in SD form."""
    s = summary(analysis)
    return (f"{analysis.model}: {s['macs']:,} MACs per image, {s['effective_macs']:,} without taps on zero "
            f"padding (energies charge {s['energy_macs']}); {s['sd_layers']} of {s['layers']} layers in SD form")


def _integer_line(analysis: Analysis) -> list[str]:
    """One sentence on integer-only SD inference (none without an integer view): its operations per image
    and its energy against the dense views, or which entries the table lacks to price it."""
    if analysis.integer is None:
        return []
    s = summary(analysis)
    line = (f"integer-only SD inference per image: {s['integer_int8_macs']:,} int8 MACs, "
            f"{s['integer_rebuild_shifts']:,} rebuild shifts and {s['integer_rebuild_adds']:,} adds, "
            f"{s['integer_requantizations']:,} requantizations; ")
    if s["integer_inference_energy"] is None:
        return [line + f"energy not priced: table '{s['integer_table']}' has no {', '.join(s['integer_unpriced'])}"]
    ratios = [f"{label} / integer {s[f'integer_inference_energy_ratio{suffix}']:.2f}x"
              for label, suffix in (("dense", ""), ("dense 8-bit", "_vs_int8"))
              if f"integer_inference_energy_ratio{suffix}" in s]
    return [line + f"energy {s['integer_inference_energy']:.4g} {s['unit']}, " + ", ".join(ratios)]


def format_text(analysis: Analysis) -> str:
    """A plain-text per-layer table and the totals."""
    rows = [list(_HEADERS)] + [_cells(row) for row in layer_rows(analysis)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    line = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    table = [line(rows[0]), "-" * len(line(rows[0])), *map(line, rows[1:])]
    totals = _totals_table(analysis)
    widths = [max(len(row[i]) for row in totals) + 2 for i in range(len(totals[0]))]
    lines = [_headline(analysis)]
    lines += [row[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) for row in totals]
    return "\n".join(table + [""] + lines + _integer_line(analysis))


def format_markdown(analysis: Analysis) -> str:
    """The per-layer table and totals as Markdown."""
    md = lambda cells: "| " + " | ".join(cells) + " |"
    totals = _totals_table(analysis)
    lines = [md(_HEADERS), md(["---"] * len(_HEADERS)), *(md(_cells(row)) for row in layer_rows(analysis))]
    lines += ["", _headline(analysis), "", md(totals[0]), md(["---"] * len(totals[0])), *map(md, totals[1:])]
    integer = _integer_line(analysis)
    return "\n".join(lines + (["", *integer] if integer else []))


def to_json(analysis: Analysis) -> str:
    """Per-layer rows and the summary as one JSON object."""
    return json.dumps(dict(summary=summary(analysis), layers=layer_rows(analysis)))


def to_csv(analysis: Analysis) -> str:
    """The per-layer rows as CSV with a header line."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=_COLUMNS)
    writer.writeheader()
    writer.writerows(layer_rows(analysis))
    return stream.getvalue()


FORMATS = {"text": format_text, "markdown": format_markdown, "json": to_json, "csv": to_csv}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_energy(analysis: Analysis, path: str) -> None:
    """Stacked inference energy per layer and part (DRAM, buffer, register, MAC, rebuild), dense beside SD."""
    plt = _pyplot()
    names = [layer.name for layer in analysis.network.layers]
    x = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(max(8, 0.3 * len(names)), 5))
    colors = plt.get_cmap("tab10").colors
    for offset, (label, result, hatch) in enumerate((("dense", analysis.dense, ""), ("SD", analysis.sd, "//"))):
        bottom = np.zeros(len(names))
        for j, (part, values) in enumerate(sorted(result["inference"].items())):
            axis.bar(x + (offset - 0.5) * 0.4, values, 0.4, bottom=bottom, color=colors[j], hatch=hatch,
                     label=f"{label}: {part}")
            bottom += np.asarray(values)
    axis.set_xticks(x, names, rotation=90, fontsize=6)
    axis.set_ylabel(f"inference energy per image ({analysis.unit})")
    axis.set_title(f"{analysis.model}: energy per layer, dense (left) and SD (right, hatched)")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_storage(analysis: Analysis, path: str) -> None:
    """Stored weight bits per layer, dense beside SD."""
    plt = _pyplot()
    names = [layer.name for layer in analysis.network.layers]
    x = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(max(8, 0.3 * len(names)), 4))
    axis.bar(x - 0.2, analysis.dense["storage"]["weights"], 0.4, label="dense")
    axis.bar(x + 0.2, analysis.sd["storage"]["weights"], 0.4, label="SD")
    axis.set_xticks(x, names, rotation=90, fontsize=6)
    axis.set_ylabel("weight storage (bits)")
    axis.set_yscale("log")
    axis.set_title(f"{analysis.model}: storage per layer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
