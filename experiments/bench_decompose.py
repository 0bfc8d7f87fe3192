"""Benchmark: whole-network SD decomposition, batched JAX against the authors' NumPy per-block loop.

    python -m experiments.bench_decompose [--networks=resnet50,resnet18_cifar] [--repeats=3]
        [--numpy_fraction=1.0] [--json]

For ImageNet ResNet-50 and CIFAR ResNet-18 (kernel shapes traced from the model zoo, seeded
He-normal weights), it times `decompose_network` (compilation reported apart) and the NumPy loop of
`experiments/numpy_reference.py` on the same blocks with the same options, alternating A B A B in
one process, and reports medians, the speed-up and both reconstruction errors. With
--numpy_fraction < 1 the loop runs on a seeded sample of every tensor's blocks; its time is scaled
to all blocks and both errors are then measured on that sample. It also times the k x k
3 x 3 Gram solve of `sd_jax.core.lstsq` (closed form) against jnp.linalg.solve (batched LAPACK).
Runs in about 2-4 minutes on 2 CPU cores; the last line with --json is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchmarking, numpy_reference
from experiments.benchmarking import machine
from sd_jax import models
from sd_jax.models.synthetic import he_normal_params
from sd_jax.core import blocking
from sd_jax.core.decompose import DecomposeOptions
from sd_jax.core.lstsq import solve_gram
from sd_jax.core.network import decompose_network

NETWORKS = {  # name -> (zoo name, classes, input side)
    "resnet50": ("resnet50_imagenet", 1000, 224),
    "resnet18_cifar": ("resnet18", 10, 32),
}

_NETWORKS = flags.DEFINE_list("networks", list(NETWORKS), f"Networks to run, of {list(NETWORKS)}.")
_REPEATS = 3  # timed runs per function unless --repeats says otherwise
_NUMPY_REPEATS = flags.DEFINE_integer("numpy_repeats", 1, "Timed NumPy-loop runs per network.")
_NUMPY_FRACTION = flags.DEFINE_float("numpy_fraction", 1.0, "Fraction of each tensor's blocks the NumPy loop runs.")
_THRESHOLD = flags.DEFINE_float("threshold", DecomposeOptions.threshold, "Element sparsity threshold.")
_ITERATIONS = flags.DEFINE_integer("iterations", DecomposeOptions.iterations, "Most alternating rounds per block.")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def numpy_loop(samples, options: DecomposeOptions):
    """Run the NumPy loop on every sampled block; return per-block errors and norms (squared)."""
    error_sq = norm_sq = 0.0
    for blocks in samples:
        coeff, basis = numpy_reference.decompose_blocks(
            blocks, threshold=options.threshold, max_coeff=options.max_coeff, iterations=options.iterations
        )
        error_sq += float(np.sum((blocks - coeff @ basis) ** 2))
        norm_sq += float(np.sum(blocks**2))
    return error_sq, norm_sq


def bench_network(name: str) -> dict:
    zoo_name, classes, side = NETWORKS[name]
    model = models.get(zoo_name, num_classes=classes)
    params = he_normal_params(model, (1, side, side, 3))
    defaults = dict(threshold=_THRESHOLD.value, iterations=_ITERATIONS.value)
    options = DecomposeOptions(**defaults)
    compile_seconds, result = timed(lambda: decompose_network(params, **defaults))
    decomposed = {r.name for r in result.reports}
    leaves = {"/".join(str(getattr(k, "key", k)) for k in p): v
              for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    rng = np.random.default_rng(1)
    samples, picks, total_blocks, sampled_blocks = [], [], 0, 0
    for report in result.reports:
        spec = blocking.block_spec(report.shape, report.kind)
        blocks = np.asarray(blocking.to_blocks(jnp.asarray(leaves[report.name]), spec))
        count = max(1, round(_NUMPY_FRACTION.value * spec.num_blocks))
        pick = np.sort(rng.choice(spec.num_blocks, count, replace=False))
        samples.append(blocks[pick])
        picks.append((report.name, pick))
        total_blocks += spec.num_blocks
        sampled_blocks += count

    jax_times, numpy_times = [], []
    for repeat in range(max(benchmarking.repeats(_REPEATS), _NUMPY_REPEATS.value)):
        if repeat < benchmarking.repeats(_REPEATS):
            seconds, result = timed(lambda: decompose_network(params, **defaults))
            jax_times.append(seconds)
        if repeat < _NUMPY_REPEATS.value:
            seconds, (np_error_sq, np_norm_sq) = timed(lambda: numpy_loop(samples, options))
            numpy_times.append(seconds * total_blocks / sampled_blocks)

    by_name = {r.name: r for r in result.reports}
    tree_leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        result.tree, is_leaf=lambda x: hasattr(x, "reconstruct"))[0]:
        tree_leaves["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    jax_error_sq = 0.0
    for (layer, pick), blocks in zip(picks, samples):
        sd = tree_leaves[layer]
        rebuilt = np.asarray(sd.coeff)[pick] @ np.asarray(sd.basis)[pick]
        jax_error_sq += float(np.sum((blocks - rebuilt) ** 2))
    seconds = statistics.median(jax_times)
    numpy_seconds = statistics.median(numpy_times)
    decomposed_params = sum(r.params for r in by_name.values())
    return dict(
        params=int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params))),
        decomposed_params=int(decomposed_params),
        decomposed_tensors=len(decomposed),
        blocks=total_blocks,
        seconds=seconds,
        compile_seconds=compile_seconds - seconds,
        numpy_seconds=numpy_seconds,
        numpy_fraction=sampled_blocks / total_blocks,
        speedup=numpy_seconds / seconds,
        params_per_second=decomposed_params / seconds,
        rel_error=float(np.sqrt(jax_error_sq / np_norm_sq)),
        numpy_rel_error=float(np.sqrt(np_error_sq / np_norm_sq)),
        network_rel_error=float(np.sqrt(sum(r.rel_error**2 * r.params for r in result.reports) / decomposed_params)),
        density=sum(r.nonzeros for r in result.reports) / sum(r.coeff_entries for r in result.reports),
        max_rounds=max(r.rounds for r in result.reports),
        jax_runs=jax_times,
        numpy_runs=numpy_times,
    )


def bench_solver(num_blocks: int = 45_000, repeats: int = 7) -> dict:
    """The closed-form k x k solve (k = 3) against a batched LAPACK solve of the same Gram systems."""
    key_a, key_b = jax.random.split(jax.random.key(2))
    columns = jax.random.normal(key_a, (num_blocks, 3, 64))
    gram = jnp.einsum("nim,njm->nij", columns, columns)
    cross = jax.random.normal(key_b, (num_blocks, 3, 3))
    ours = jax.jit(solve_gram)
    lapack = jax.jit(jnp.linalg.solve)
    jax.block_until_ready((ours(gram, cross), lapack(gram, cross)))
    ours_times, lapack_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(lambda: ours(gram, cross))[0])
        lapack_times.append(timed(lambda: lapack(gram, cross))[0])
    return dict(systems=num_blocks, closed_form_seconds=statistics.median(ours_times),
                lapack_seconds=statistics.median(lapack_times),
                lapack_over_closed_form=statistics.median(lapack_times) / statistics.median(ours_times))


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_NETWORKS.value) - set(NETWORKS))
    if unknown:
        raise app.UsageError(f"unknown network(s) {unknown}; pick from {list(NETWORKS)}")
    results = {name: bench_network(name) for name in _NETWORKS.value}
    results["solver"] = bench_solver()
    results["machine"] = machine()
    print(f"{'network':16} {'params':>11} {'blocks':>7} {'jax s':>7} {'compile s':>9} {'numpy s':>8} "
          f"{'speedup':>8} {'rel.err':>8} {'numpy err':>9} {'density':>7}")
    for name in _NETWORKS.value:
        r = results[name]
        print(f"{name:16} {r['params']:>11,} {r['blocks']:>7,} {r['seconds']:>7.2f} {r['compile_seconds']:>9.2f} "
              f"{r['numpy_seconds']:>8.1f} {r['speedup']:>7.1f}x {r['rel_error']:>8.4f} "
              f"{r['numpy_rel_error']:>9.4f} {r['density']:>7.3f}")
    solver = results["solver"]
    print(f"{solver['systems']:,} 3 x 3 Gram solves: closed form {solver['closed_form_seconds'] * 1e3:.1f} ms, "
          f"batched LAPACK {solver['lapack_seconds'] * 1e3:.1f} ms ({solver['lapack_over_closed_form']:.1f}x slower)")
    print(f"medians; NumPy loop on {results[_NETWORKS.value[0]]['numpy_fraction']:.0%} of blocks, time scaled "
          f"to all; {results['machine']['backend']} {results['machine']['devices']}, {os.cpu_count()} cores")
    if benchmarking.JSON.value:
        print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
