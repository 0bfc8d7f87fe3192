"""Per-tensor decomposition report: error, density, exponents and storage (docs/method.md 1.3, 1.5).

Storage follows the reference count: each non-zero of C costs ceil(log2(distinct magnitudes)) + 1
(sign) bits, C has a 1-bit-per-entry occupancy map (over all entries of its blocks, padding
included, as the hardware stores them), and B costs 32 bits per entry; a per-row scale, when used,
costs 32 bits per row. Dense weights cost `dense_bits` (32 by default) each.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.core import pow2

Array = jax.Array

MIN_EXPONENT = -160  # below float32's smallest subnormal, 2^-149
NUM_EXPONENTS = 300  # histogram bins cover exponents [-160, 140)
BASIS_BITS = 32
SCALE_BITS = 32


def coefficient_bits(distinct_magnitudes: int) -> int:
    """Bits of one non-zero coefficient: an exponent code plus a sign bit."""
    return (math.ceil(math.log2(distinct_magnitudes)) if distinct_magnitudes > 1 else 0) + 1


def storage_bits(
    nonzeros: int, distinct_magnitudes: int, coeff_entries: int, basis_entries: int, scale_entries: int = 0,
    *, pow2_coefficients: bool = True,
) -> int:
    """The reference storage count of one SD tensor, in bits."""
    per_nonzero = coefficient_bits(distinct_magnitudes) if pow2_coefficients else 32
    return nonzeros * per_nonzero + coeff_entries + BASIS_BITS * basis_entries + SCALE_BITS * scale_entries


@functools.partial(jax.jit, static_argnames=("num_segments",))
def tensor_statistics(
    blocks: Array, coeff: Array, basis: Array, row_scale: Array, real: Array, segment: Array, num_segments: int
) -> dict[str, Array]:
    """Per-tensor sums over a batch of blocks from several tensors; `segment` (n,) names the tensor.

    real (n, m, k) bool: the entries that are weights, not blocking padding (only they count in the
    error: C·B need not be zero on padding, and `blocking.from_blocks` drops it).

    Returns squared error and squared norm of the weight, both divided by the square of the tensor's
    largest |weight| so that neither underflows nor overflows in float32 at any scale (their ratio
    is the squared relative error), non-zero count, and a histogram of C's exponents
    (num_segments, NUM_EXPONENTS).
    """
    reconstruction = jnp.where(real, jnp.einsum("nmk,nkj->nmj", coeff * row_scale, basis), 0.0)
    per_tensor = lambda v: jax.ops.segment_sum(v, segment, num_segments)
    largest = jax.ops.segment_max(jnp.max(jnp.abs(blocks), axis=(1, 2)), segment, num_segments)
    scale = jnp.where(largest > 0, largest, 1.0)[segment][:, None, None]
    nonzero = coeff != 0
    exponent = jnp.clip(pow2.exponents(coeff) - MIN_EXPONENT, 0, NUM_EXPONENTS - 1)
    bins = segment[:, None, None] * NUM_EXPONENTS + exponent
    histogram = jnp.zeros(num_segments * NUM_EXPONENTS, jnp.int32).at[bins.reshape(-1)].add(
        nonzero.reshape(-1).astype(jnp.int32)
    )
    return dict(
        error_sq=per_tensor(jnp.sum(((blocks - reconstruction) / scale) ** 2, axis=(1, 2))),
        norm_sq=per_tensor(jnp.sum((blocks / scale) ** 2, axis=(1, 2))),
        nonzeros=per_tensor(jnp.sum(nonzero, axis=(1, 2))),
        histogram=histogram.reshape(num_segments, NUM_EXPONENTS),
    )


@dataclasses.dataclass(frozen=True)
class TensorReport:
    """What one decomposed tensor became: accuracy, sparsity, exponents and storage."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    rel_error: float
    density: float  # non-zeros over the entries of C (padding included), so never above 1
    nonzeros: int
    coeff_entries: int
    distinct_exponents: int
    min_exponent: int | None
    max_exponent: int | None
    storage_bits: int
    dense_bits: int
    rounds: int

    @property
    def compression(self) -> float:
        """Dense 32-bit storage over SD storage."""
        return self.dense_bits / self.storage_bits if self.storage_bits else math.inf

    @classmethod
    def from_statistics(
        cls, name: str, kind: str, spec: Any, options: Any, stats: dict[str, Any], rounds: int
    ) -> "TensorReport":
        """Build the report from one tensor's row of `tensor_statistics`."""
        histogram = np.asarray(stats["histogram"])
        present = np.nonzero(histogram)[0] + MIN_EXPONENT
        nonzeros = int(stats["nonzeros"])
        norm = math.sqrt(float(stats["norm_sq"]))
        error = math.sqrt(float(stats["error_sq"]))
        distinct = int(present.size) if options.pow2 else 0
        entries = spec.num_blocks * spec.rows * spec.k  # C as stored, padding included
        bits = storage_bits(
            nonzeros, distinct, entries, spec.num_blocks * spec.k * spec.k,
            spec.num_blocks * spec.rows if options.row_scale else 0, pow2_coefficients=options.pow2,
        )
        return cls(
            name=name, kind=kind, shape=tuple(spec.shape), params=spec.size,
            rel_error=error / norm if norm > 0 else 0.0, density=nonzeros / entries, nonzeros=nonzeros,
            coeff_entries=entries,
            distinct_exponents=distinct,
            min_exponent=int(present.min()) if present.size and options.pow2 else None,
            max_exponent=int(present.max()) if present.size and options.pow2 else None,
            storage_bits=bits, dense_bits=32 * spec.size, rounds=rounds,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the compression ratio."""
        return dict(dataclasses.asdict(self), shape=list(self.shape), compression=self.compression)


def totals(reports: Sequence[TensorReport], dense_params: int = 0) -> dict[str, Any]:
    """Whole-network figures; `dense_params` counts weights left dense (stored at 32 bits)."""
    params = sum(r.params for r in reports)
    entries = sum(r.coeff_entries for r in reports)
    storage = sum(r.storage_bits for r in reports) + 32 * dense_params
    dense = 32 * (params + dense_params)
    return dict(
        decomposed_tensors=len(reports),
        decomposed_params=params,
        dense_params=dense_params,
        nonzeros=sum(r.nonzeros for r in reports),
        density=sum(r.nonzeros for r in reports) / entries if entries else 0.0,
        storage_bits=storage,
        dense_bits=dense,
        compression=dense / storage if storage else math.inf,
    )


def format_table(reports: Sequence[TensorReport], dense_params: int = 0) -> str:
    """A plain-text table, one row per tensor and a total row."""
    header = ("layer", "kind", "shape", "params", "rel.err", "density", "exps", "bits", "compr.", "rounds")
    rows = [
        (
            r.name, r.kind, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.rel_error:.4f}",
            f"{r.density:.3f}", str(r.distinct_exponents), f"{r.storage_bits:,}", f"{r.compression:.1f}x",
            str(r.rounds),
        )
        for r in reports
    ]
    total = totals(reports, dense_params)
    rows.append((
        "total", "", "", f"{total['decomposed_params']:,}", "", f"{total['density']:.3f}", "",
        f"{total['storage_bits']:,}", f"{total['compression']:.1f}x", "",
    ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def to_json(reports: Sequence[TensorReport], dense_params: int = 0) -> str:
    """The per-layer reports and totals as one JSON object."""
    return json.dumps(dict(layers=[r.to_dict() for r in reports], total=totals(reports, dense_params)))
