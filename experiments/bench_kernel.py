"""Benchmark: the fused rebuild-and-multiply kernel (`sd_jax.kernels.sd_matmul`) on a weight-bound layer.

    python -m experiments.bench_kernel [--din=4096] [--dout=4096] [--batches=1,8,64]
        [--dtypes=float32,bfloat16] [--repeats=20] [--row_tile=N] [--col_tile=N] [--json]

One SD dense layer (din x dout, the reference blocking: rows of 3 inputs, blocks of at most 192 rows;
C seeded, half its entries zero, the rest ±2^e with e in -8..5; B normal) and, per input dtype and
batch, three jitted ways to compute y = x @ W:
- dense: XLA's matmul of the rebuilt W, stored in HBM in the input dtype (what a dense model reads);
- rebuild_then_matmul: XLA decodes the int8 codes, rebuilds W = from_blocks(C @ B) in HBM
  (`sd_jax.kernels.rebuild`), then multiplies;
- fused: the Pallas kernel, W rebuilt tile by tile on chip from the codes and B.
Bytes read from HBM for the weight, from the formats: dense W (din * dout * itemsize); fused: int8
codes (padding included) + B in float32; rebuild_then_matmul: the fused bytes + W written and read
back once (a lower bound: XLA may keep float32 intermediates); `sdpack_bytes` is the bit-packed file
format's size (docs/method.md 1.5), what a kernel reading bit-packed codes would move.

On a GPU or TPU each function is compiled and checked against dense (max |error| / max |y|), then
the three alternate (A B C A B C ...), `--repeats` timed calls each ended with
`jax.block_until_ready`; medians, dense / fused and dense / rebuild_then_matmul ratios, and the
effective bandwidth (weight bytes / median time). On CPU the kernel runs in Pallas interpret mode,
which says nothing about its speed: the script then checks correctness at every batch and dtype,
prints the byte figures and times nothing (timings need a GPU or TPU). About 2 minutes on 2 CPU
cores for the 4096 x 4096 layer; seconds on a GPU. The last line with --json is one JSON object.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchmarking
from experiments.benchmarking import report
from sd_jax.core import blocking
from sd_jax.core.report import storage_bits
from sd_jax.kernels import pack, rebuild, sd_matmul

_DIN = flags.DEFINE_integer("din", 4096, "Inputs of the dense layer.")
_DOUT = flags.DEFINE_integer("dout", 4096, "Outputs of the dense layer.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes (rows of x).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes of x (and of the dense W).")
_REPEATS = 20  # timed runs per function unless --repeats says otherwise
_ROW_TILE = flags.DEFINE_integer("row_tile", None, "Block rows rebuilt per step (default: pack's choice).")
_COL_TILE = flags.DEFINE_integer("col_tile", None, "Output units per program (default: pack's choice).")

DENSITY = 0.5
EXPONENTS = (-8, 5)  # the reference's range at threshold 4e-3 and max_C = 32


def sd_layer(din: int, dout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, blocking.BlockSpec]:
    """Seeded C (n, m, k) of 0 and ±2^e and B (n, k, k) for a din x dout dense kernel."""
    spec = blocking.block_spec((din, dout), "dense")
    rng = np.random.default_rng(seed)
    size = spec.block_shape
    exponents = rng.integers(EXPONENTS[0], EXPONENTS[1] + 1, size, dtype=np.int32)
    coeff = np.ldexp(rng.choice(np.float32([-1, 1]), size), exponents) * (rng.random(size) < DENSITY)
    basis = rng.normal(size=(spec.num_blocks, spec.k, spec.k)) / 16
    return coeff.astype(np.float32), basis.astype(np.float32), spec


def weight_bytes(spec: blocking.BlockSpec, coeff: np.ndarray, basis: np.ndarray, packed_bytes: int,
                 dtype: str) -> dict[str, int]:
    """HBM bytes each path reads (and, for rebuild_then_matmul, writes) for the weight."""
    dense = spec.size * jnp.dtype(dtype).itemsize
    nonzero = coeff[coeff != 0]
    magnitudes = np.unique(np.abs(nonzero)).size
    sdpack_bits = storage_bits(nonzero.size, magnitudes, coeff.size, basis.size)
    return dict(dense=int(dense), fused=int(packed_bytes), rebuild_then_matmul=int(packed_bytes + 2 * dense),
                sdpack_bytes=-(-sdpack_bits // 8))


def _matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x @ W as XLA runs a dense layer: W in x's dtype, float32 accumulation."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, weight.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)


def _seconds(fn: Callable, *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _relative_error(y: jax.Array, reference: jax.Array) -> float:
    y, reference = np.asarray(y, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(y - reference).max() / np.abs(reference).max())


def bench(din: int, dout: int, batches: list[int], dtypes: list[str], repeats: int,
          row_tile: int | None = None, col_tile: int | None = None) -> dict[str, Any]:
    """Correctness (always), bytes (always) and timings (on an accelerator) for every dtype and batch."""
    coeff, basis, spec = sd_layer(din, dout)
    packed = pack(coeff, basis, spec, row_tile=row_tile, col_tile=col_tile)
    kernel = blocking.from_blocks(np.einsum("nmk,nkj->nmj", coeff, basis), spec)
    timed = jax.default_backend() != "cpu"
    results: dict[str, Any] = {}
    for dtype in dtypes:
        weight = jnp.asarray(kernel, dtype)
        functions = {"dense": (jax.jit(_matmul), weight),
                     "rebuild_then_matmul": (jax.jit(lambda x, p: _matmul(x, rebuild(p))), packed),
                     "fused": (jax.jit(sd_matmul), packed)}
        bytes_read = weight_bytes(spec, coeff, basis, packed.hbm_bytes, dtype)
        for batch in batches:
            x = jax.random.normal(jax.random.key(batch), (batch, din), dtype)
            outputs = {name: fn(x, w) for name, (fn, w) in functions.items()}  # compiles each
            result: dict[str, Any] = dict(
                din=din, dout=dout, batch=batch, dtype=dtype, density=DENSITY, bytes=bytes_read,
                row_tile=packed.row_tile, col_tile=packed.col_tile,
                dense_over_fused_bytes=bytes_read["dense"] / bytes_read["fused"],
                fused_error=_relative_error(outputs["fused"], outputs["dense"]),
                rebuild_then_matmul_error=_relative_error(outputs["rebuild_then_matmul"], outputs["dense"]),
                interpret=not timed)
            if timed:
                times: dict[str, list[float]] = {name: [] for name in functions}
                for _ in range(repeats):
                    for name, (fn, w) in functions.items():
                        times[name].append(_seconds(fn, x, w))
                median = {name: statistics.median(values) for name, values in times.items()}
                result.update(
                    seconds=median, dense_over_fused=median["dense"] / median["fused"],
                    dense_over_rebuild_then_matmul=median["dense"] / median["rebuild_then_matmul"],
                    weight_gb_per_second={name: bytes_read[name] / median[name] / 1e9 for name in median},
                    all_seconds={name: [round(t, 7) for t in values] for name, values in times.items()},
                    repeats=repeats)
            else:
                result["timings"] = "not measured: on CPU the kernel runs in Pallas interpret mode; run on a GPU or TPU"
            results[f"{din}x{dout}_{dtype}_batch{batch}"] = result
    return results


def main(argv: list[str]) -> None:
    del argv
    results = bench(_DIN.value, _DOUT.value, [int(b) for b in _BATCHES.value], _DTYPES.value, benchmarking.repeats(_REPEATS),
                    _ROW_TILE.value, _COL_TILE.value)
    for name, r in results.items():
        b = r["bytes"]
        line = (f"{name}: weight bytes dense {b['dense']:,}, fused {b['fused']:,} ({r['dense_over_fused_bytes']:.2f}x "
                f"fewer), rebuild_then_matmul >= {b['rebuild_then_matmul']:,}, sdpack {b['sdpack_bytes']:,}; "
                f"max error / max |y| fused {r['fused_error']:.2e}, rebuild_then_matmul "
                f"{r['rebuild_then_matmul_error']:.2e}")
        if "seconds" in r:
            s = r["seconds"]
            line += (f"; median s dense {s['dense']:.3e}, rebuild_then_matmul {s['rebuild_then_matmul']:.3e}, fused "
                     f"{s['fused']:.3e}; dense / fused {r['dense_over_fused']:.2f}x")
        else:
            line += f"; {r['timings']}"
        print(line, flush=True)
    report(results, as_json=benchmarking.JSON.value)


if __name__ == "__main__":
    app.run(main)
