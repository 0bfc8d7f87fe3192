"""Benchmark: peak memory of the compiled train step with low-bit stored activations against exact.

    python -m experiments.bench_memory [--models=resnet20] [--batch=128] [--json]

For ResNet-20 on Fashion-MNIST (28x28x1) and CIFAR-10 (32x32x3) shapes, batch 128, float32, dense
and SD (the from-scratch tuned recipe's layers: `SDRules(mode="latent")` with the latent update of
C), it compiles the donating train step of `sd_jax.train.step.make_steps` (one-device "data" mesh)
with exact stored activations and with `stored_activation_bits` 8 and 4, and reports XLA's memory
analysis of each (`sd_jax.train.step.step_memory`: argument, output, aliased and temporary bytes,
and `peak_bytes`) and `peak_memory_ratio` = peak / the exact step's peak of the same model, all
in one process. Nothing runs; only compilation (about 2 minutes on the shared 2-core CPU). With
--repeats=N (N > 0) it also times N runs of each train step, alternated across the three widths, and
reports the medians and `seconds_ratio_{bits}` against exact (about 3 more minutes at N = 5).
The last line with --json is one JSON object with one entry per (dataset, model, dense/SD) and the
machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app

from experiments import benchmarking
from experiments.benchmarking import report
from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SDRules
from sd_jax.nn.layers import low_precision_factories
from sd_jax.train import sharding
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.step import create_train_state, make_steps, step_memory

MODELS = ("resnet20",)
BATCH = 128

NUM_CLASSES = 10
SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
BITS = (None, 8, 4)


def _model(name: str, sd: bool, bits: int | None) -> Any:
    """The dense or SD (latent C) model with its layers' inputs, and its batch norms' and ReLUs' (where
    the model has `stored_activation_bits`), stored at `bits` (None: exact)."""
    own = models.stored_activation_options(name, bits)
    if sd:
        return models.get(name, num_classes=NUM_CLASSES, sd=SDRules(mode="latent", stored_activation_bits=bits), **own)
    if bits is None:
        return models.get(name, num_classes=NUM_CLASSES)
    return models.get(name, num_classes=NUM_CLASSES, **low_precision_factories(stored_activation_bits=bits), **own)


def _time_steps(steps: dict[Any, tuple[Any, Any, Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each (step, state, batch), the steps alternated; the state is donated, so each
    run continues from the last one's output."""
    times: dict[Any, list[float]] = {bits: [] for bits in steps}
    states = {bits: state for bits, (_, state, _) in steps.items()}
    for bits, (train, _, batch) in steps.items():  # the first run of each compiles and is not timed
        states[bits] = jax.block_until_ready(train(states[bits], batch)[0])
    for _ in range(repeats):
        for bits, (train, _, batch) in steps.items():
            start = time.perf_counter()
            states[bits] = jax.block_until_ready(train(states[bits], batch)[0])
            times[bits].append(time.perf_counter() - start)
    exact = statistics.median(times[None])
    figures = {f"seconds_{bits or 'exact'}": statistics.median(values) for bits, values in times.items()}
    figures.update({f"seconds_ratio_{bits}": statistics.median(times[bits]) / exact for bits in BITS[1:]})
    return figures


def measure(name: str, shape: tuple[int, ...], sd: bool, batch_size: int, repeats: int = 0) -> dict[str, Any]:
    """Memory of the compiled train step at each of BITS and the peak ratios against exact (and with
    `repeats`, its median time and the ratios against exact)."""
    batch = {"image": jnp.zeros((batch_size, *shape), jnp.float32), "label": jnp.zeros((batch_size,), jnp.int32)}
    mesh = sharding.data_mesh(jax.devices()[:1])
    figures: dict[str, Any] = {}
    steps = {}
    for bits in BITS:
        model = _model(name, sd, bits)
        tx = sd_optimizer(0.1, coeff_update="latent" if sd else "bucket_switch")
        state = create_train_state(model.apply, synthetic_variables(model, batch["image"]), tx, jax.random.key(0))
        train, _, state = make_steps(mesh, state)
        placed = jax.device_put(batch, sharding.batch_sharding(mesh))
        figures[f"bits_{bits or 'exact'}"] = step_memory(train, state, placed)
        steps[bits] = (train, state, placed)
    exact = figures["bits_exact"]["peak_bytes"]
    for bits in BITS[1:]:
        figures[f"peak_memory_ratio_{bits}"] = figures[f"bits_{bits}"]["peak_bytes"] / exact
    return dict(figures, **_time_steps(steps, repeats)) if repeats else figures


def main(argv: list[str]) -> None:
    del argv
    results, batch = {}, benchmarking.batch(BATCH)
    for name in benchmarking.models(MODELS):
        for dataset, shape in SHAPES.items():
            for sd in (False, True):
                key = f"{dataset}_{name}_{'sd' if sd else 'dense'}"
                figures = measure(name, shape, sd, batch, benchmarking.repeats(0))
                results[key] = dict(figures, dataset=dataset, model=name, sd=sd, batch=batch,
                                    input_shape=list(shape))
                ratios = {bits: round(results[key][f"peak_memory_ratio_{bits}"], 3) for bits in BITS[1:]}
                timed = ""
                if "seconds_exact" in results[key]:
                    timed = (f"; step {results[key]['seconds_exact']:.3f} s exact, time ratio at 8 / 4 bits "
                             f"{results[key]['seconds_ratio_8']:.3f} / {results[key]['seconds_ratio_4']:.3f} (medians)")
                print(f"{key}: exact peak {results[key]['bits_exact']['peak_bytes'] / 2**20:.1f} MiB, "
                      f"peak ratio at 8 / 4 bits {ratios[8]} / {ratios[4]}{timed}", flush=True)
    report(results, as_json=benchmarking.JSON.value)


if __name__ == "__main__":
    app.run(main)
