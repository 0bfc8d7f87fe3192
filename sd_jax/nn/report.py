"""Per-model SD report: per layer and in total, density of C, distinct exponents, storage and compression.

Input: a parameter tree whose SD kernels are `Decomposition`s, from a trained SD model
(`sd_jax.nn.sd_tree(model, variables, x, ...)`) or straight from a decomposition
(`decompose_network(...).tree`, `to_sd(...)[1].tree`). Storage is the reference count of docs/method.md
1.5 (`sd_jax.core.report.storage_bits`): per non-zero of C, ceil(log2(distinct magnitudes)) + 1 bits,
a 1-bit occupancy map over C's entries (padding included, as stored), 32 bits per entry of B.

Compression compares against the same kernels stored dense at 32 and at 8 bits a weight. Totals
cover every conv / dense kernel of the model: kernels left dense count at the baseline's width on
both sides. Biases, batch-norm parameters and statistics are not weights here and count on neither.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from sd_jax.core.decompose import Decomposition
from sd_jax.core.report import storage_bits
from sd_jax.core.network import path_name

DENSE_WIDTHS = (32, 8)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """Storage figures of one SD kernel."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int  # real weight entries of the kernel
    coeff_entries: int  # entries of C as stored, padding included
    nonzeros: int
    distinct_exponents: int
    min_exponent: int | None
    max_exponent: int | None
    storage_bits: int

    @property
    def density(self) -> float:
        """Non-zeros over the entries of C."""
        return self.nonzeros / self.coeff_entries

    def compression(self, dense_width: int) -> float:
        """Dense storage at `dense_width` bits a weight over SD storage."""
        return dense_width * self.params / self.storage_bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields with density and compression ratios."""
        return dict(dataclasses.asdict(self), shape=list(self.shape), density=self.density,
                    **{f"compression_vs_{w}bit": self.compression(w) for w in DENSE_WIDTHS})


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Per-layer reports and the kernels left dense."""

    layers: list[LayerReport]
    dense_kernel_params: int  # weights of kernels that stayed dense

    def totals(self) -> dict[str, Any]:
        """Whole-model figures (kernels left dense at the baseline's width on both sides)."""
        params = sum(r.params for r in self.layers)
        nonzeros = sum(r.nonzeros for r in self.layers)
        entries = sum(r.coeff_entries for r in self.layers)
        sd_bits = sum(r.storage_bits for r in self.layers)
        total = dict(sd_layers=len(self.layers), sd_params=params, dense_kernel_params=self.dense_kernel_params,
                     nonzeros=nonzeros, density=nonzeros / entries if entries else 0.0, sd_storage_bits=sd_bits)
        for width in DENSE_WIDTHS:
            dense = width * (params + self.dense_kernel_params)
            total[f"compression_vs_{width}bit"] = dense / (sd_bits + width * self.dense_kernel_params)
        return total

    def table(self) -> str:
        """A plain-text table, one row per SD layer and a total row."""
        header = ("layer", "kind", "shape", "params", "density", "exps", "bits", "vs 32-bit", "vs 8-bit")
        rows = [(r.name, r.kind, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.density:.3f}",
                 str(r.distinct_exponents), f"{r.storage_bits:,}", f"{r.compression(32):.2f}x",
                 f"{r.compression(8):.2f}x") for r in self.layers]
        total = self.totals()
        footer = (f"total ({self.dense_kernel_params:,} dense weights)", "", "", f"{total['sd_params']:,}",
                  f"{total['density']:.3f}", "", f"{total['sd_storage_bits']:,}",
                  f"{total['compression_vs_32bit']:.2f}x", f"{total['compression_vs_8bit']:.2f}x")
        widths = [max(len(row[i]) for row in (header, *rows, footer)) for i in range(len(header))]
        line = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, rows), rule, line(footer)])

    def to_json(self) -> str:
        """The per-layer reports and totals as one JSON object."""
        return json.dumps(dict(layers=[r.to_dict() for r in self.layers], total=self.totals()))


def layer_report(name: str, decomposition: Decomposition) -> LayerReport:
    """Storage figures of one decomposed kernel (its coefficients must be 0 or signed powers of two)."""
    coeff = np.asarray(decomposition.coeff, np.float32)
    nonzero = coeff[coeff != 0]
    mantissa, exponent = np.frexp(nonzero)
    if not np.all(np.abs(mantissa) == 0.5):
        raise ValueError(f"layer '{name}': coefficients are not all 0 or signed powers of two; "
                         "report the coefficients the layer uses (sd_jax.nn.sd_tree quantizes latent ones)")
    exponents = np.unique(exponent - 1)
    spec = decomposition.spec
    return LayerReport(
        name=name, kind=spec.kind, shape=tuple(spec.shape), params=spec.size, coeff_entries=coeff.size,
        nonzeros=int(nonzero.size), distinct_exponents=int(exponents.size),
        min_exponent=int(exponents.min()) if exponents.size else None,
        max_exponent=int(exponents.max()) if exponents.size else None,
        storage_bits=storage_bits(int(nonzero.size), int(exponents.size), coeff.size,
                                  int(np.size(decomposition.basis))),
    )


def model_report(tree: Any) -> ModelReport:
    """The SD report of a parameter tree with `Decomposition` kernels (see the module docstring)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda leaf: isinstance(leaf, Decomposition))[0]
    layers, dense = [], 0
    for path, leaf in leaves:
        name = path_name(path)
        if isinstance(leaf, Decomposition):
            if leaf.row_scale is not None:
                raise ValueError(f"layer '{name}': a row-scaled decomposition; the report counts SD layers, "
                                 "which store no row scale; decompose with row_scale=False")
            layers.append(layer_report(name.removesuffix("/kernel"), leaf))
        elif path_name(path[-1:]) == "kernel":
            dense += math.prod(np.shape(leaf))
    if not layers:
        raise ValueError("model_report: the tree has no Decomposition kernel; pass sd_tree(model, variables, x) "
                         "or a decompose_network(...).tree")
    return ModelReport(layers=layers, dense_kernel_params=dense)
