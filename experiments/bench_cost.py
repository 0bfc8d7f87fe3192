"""Benchmark: the cost analyzer on ImageNet ResNet-50, and a sweep of 10,000 hardware descriptions.

    python -m experiments.bench_cost [--repeats=5] [--json]

resnet50_seconds: extraction by tracing + counts + inference and training energy of dense and SD
views, end to end in a fresh process, compilation included (the first call; SD statistics of a
fixed synthetic density, so no decomposition is timed). sweep_10000_seconds: median of `repeats`
calls of the jitted, vmapped energy over 10,000 descriptions after one compiling call (reported
apart). Runs in about 10 s on 2 CPU cores; the last line with --json is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from absl import app

from experiments import benchmarking
from experiments.benchmarking import machine
from sd_jax import models
from sd_jax.cost import analysis, energy, hardware, layers

_REPEATS = 5  # timed runs per function unless --repeats says otherwise


def _resnet50_analysis() -> analysis.Analysis:
    network = layers.extract_layers(models.get("resnet50_imagenet", num_classes=1000), (1, 224, 224, 3), train=False)
    stats = lambda layer: layers.SDStats(layer.weights // 4, layer.weights, layer.weights // 3, 12, 3)
    network = dataclasses.replace(network, layers=tuple(dataclasses.replace(layer, sd=stats(layer))
                                                        for layer in network.layers))
    return analysis.analyze(network, "resnet50_imagenet", unit="pJ", dense_hardware=hardware.hardware(),
                            sd_hardware=hardware.hardware(weight_bits=8, activation_bits=8))


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    result = _resnet50_analysis()
    resnet50_seconds = time.perf_counter() - start
    counts = energy.layer_counts(result.network)
    rng = np.random.default_rng(0)
    swept = hardware.sweep(hardware.hardware(weight_bits=8, activation_bits=8),
                           buffer_bits=rng.uniform(1e4, 1e8, 10000), dram_per_bit=rng.uniform(1, 40, 10000))
    start = time.perf_counter()
    jax.block_until_ready(energy.sweep_energy(counts, swept))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(benchmarking.repeats(_REPEATS)):
        start = time.perf_counter()
        jax.block_until_ready(energy.sweep_energy(counts, swept))
        times.append(time.perf_counter() - start)
    summary = analysis.summary(result)
    out = dict(
        resnet50_seconds=resnet50_seconds, sweep_10000_seconds=statistics.median(times),
        sweep_10000_first_call_seconds=compile_seconds, sweep_repeats=len(times),
        resnet50_layers=len(result.network.layers), resnet50_macs=summary["macs"], machine=machine(),
    )
    print(f"ResNet-50 analysis (fresh process, compilation included): {resnet50_seconds:.2f} s; "
          f"sweep of 10,000: median {out['sweep_10000_seconds'] * 1e3:.1f} ms, first call {compile_seconds:.2f} s")
    if benchmarking.JSON.value:
        print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
