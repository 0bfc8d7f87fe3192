"""Benchmark: forward and forward+backward time of SD models against their dense twins.

    python -m experiments.bench_forward [--models=resnet20,resnet18] [--batch=128] [--repeats=5] [--json]

For CIFAR ResNet-20 and ResNet-18 (32x32x3 inputs, 10 classes, float32) it builds the dense model
(`models.get(name)`) and the SD model (`models.get(name, sd=True)`: every conv and the classifier
SD, 'latent' mode, so each step re-quantizes C, masks it and rebuilds the kernels). Weights
(`sd_jax.models.synthetic`) and data are seeded; their values do not change the work done.
Timed functions, each jitted:
- forward+backward: one training step's gradients, train mode (batch statistics updated), softmax
  cross-entropy, gradients of `params` (dense) or `params`, `sd_basis`, `sd_coeff` (SD);
- forward: eval-mode logits.
Dense and SD calls alternate (A B A B ...) in one process; the first call of each is compilation
(reported apart as `*_compile_seconds`: tracing, compiling and one run); medians of `--repeats` calls, each ended with
`jax.block_until_ready`. Runs in about 3 minutes on 2 CPU cores; the last line with --json is one
JSON object with one entry per model: dense_seconds, sd_seconds and sd_over_dense (forward+backward),
forward_dense_seconds, forward_sd_seconds, forward_sd_over_dense, compile times, and the machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import app

from experiments import benchmarking
from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SD_MASK

MODELS = ("resnet20", "resnet18")  # CIFAR forms
BATCH = 128
_REPEATS = 5  # timed runs per function unless --repeats says otherwise

NUM_CLASSES = 10
SIDE = 32


def step_functions(model: Any, variables: dict) -> tuple[Callable, Callable]:
    """(forward+backward, forward) jitted for `model`; both take (variables, x, labels)."""
    trainable = [c for c in variables if c not in ("batch_stats", SD_MASK)]

    def loss(train_vars, fixed, x, labels):
        logits, updates = model.apply({**fixed, **train_vars}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    @jax.jit
    def forward_backward(variables, x, labels):
        train_vars = {c: variables[c] for c in trainable}
        fixed = {c: v for c, v in variables.items() if c not in trainable}
        return jax.grad(loss, has_aux=True)(train_vars, fixed, x, labels)

    @jax.jit
    def forward(variables, x, labels):
        del labels
        return model.apply(variables, x, train=False)

    return forward_backward, forward


def _seconds(fn: Callable, *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_model(name: str, batch: int, repeats: int) -> dict[str, Any]:
    """Alternating dense / SD timings of one model; medians, ratios and compile times."""
    key_x, key_y = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (batch, SIDE, SIDE, 3), jnp.float32)
    labels = jax.random.randint(key_y, (batch,), 0, NUM_CLASSES)
    sides = {}
    for side, sd in (("dense", False), ("sd", True)):
        model = models.get(name, num_classes=NUM_CLASSES, sd=sd)
        variables = synthetic_variables(model, x)
        sides[side] = (variables, *step_functions(model, variables))
    result: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    for kind, index in (("forward_backward", 1), ("forward", 2)):
        for side, (variables, *functions) in sides.items():  # compile each, once
            result[f"{kind}_{side}_compile_seconds"] = _seconds(functions[index - 1], variables, x, labels)
        for _ in range(repeats):
            for side, (variables, *functions) in sides.items():
                times.setdefault(f"{kind}_{side}", []).append(_seconds(functions[index - 1], variables, x, labels))
    median = {key: statistics.median(values) for key, values in times.items()}
    result.update(
        dense_seconds=median["forward_backward_dense"], sd_seconds=median["forward_backward_sd"],
        sd_over_dense=median["forward_backward_sd"] / median["forward_backward_dense"],
        forward_dense_seconds=median["forward_dense"], forward_sd_seconds=median["forward_sd"],
        forward_sd_over_dense=median["forward_sd"] / median["forward_dense"],
        all_seconds={key: [round(t, 4) for t in values] for key, values in times.items()},
        batch=batch, dtype="float32", repeats=repeats, sd_mode="latent",
    )
    return result


def _describe(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: forward+backward dense {r['dense_seconds']:.4f} s, SD {r['sd_seconds']:.4f} s, "
            f"SD/dense {r['sd_over_dense']:.3f}; forward dense {r['forward_dense_seconds']:.4f} s, "
            f"SD {r['forward_sd_seconds']:.4f} s, SD/dense {r['forward_sd_over_dense']:.3f}; compile "
            f"fwd+bwd dense {r['forward_backward_dense_compile_seconds']:.1f} s, "
            f"SD {r['forward_backward_sd_compile_seconds']:.1f} s")


def main(argv: list[str]) -> None:
    del argv
    benchmarking.each_model(benchmarking.models(MODELS), lambda name: bench_model(name, benchmarking.batch(BATCH),
                                                                      benchmarking.repeats(_REPEATS)), _describe)


if __name__ == "__main__":
    app.run(main)
