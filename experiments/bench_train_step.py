"""Benchmark: the full train step (forward, backward, optimizer update) of SD models against dense.

    python -m experiments.bench_train_step [--models=resnet20,resnet18] [--batch=128] [--repeats=5]
        [--breakdown] [--baseline=torch] [--dtype=bfloat16] [--json]

For CIFAR ResNet-20 and ResNet-18 (32x32x3 inputs, 10 classes, float32, batch 128) it times the
jitted, donating train step of `sd_jax.train.step.make_steps` (one-device "data" mesh):
- dense: `models.get(name)`, SGD with momentum 0.9 and weight decay 5e-4 on `params`;
- SD: `models.get(name, sd=SDRules(mode="pow2"))` (every conv and the classifier SD, C used as
  stored), SGD on `params` and `sd_basis`, the bucket-switch update on `sd_coeff`;
both built by `sd_optimizer` exactly as the trainer builds them (constant learning rate `--lr`).
Weights (`sd_jax.models.synthetic`) and the batch are seeded. The state is donated, so each call
takes the state the previous call returned (the model keeps training; the work per step is the same).
Dense and SD calls alternate (A B A B ...) in one process; the first call of each is compilation,
reported apart as `*_compile_seconds` (tracing, compiling and one run); medians of `--repeats` calls,
each ended with `jax.block_until_ready`.

`--breakdown` also times, alternating in the same way, what the SD step is made of: the gradients
alone (forward+backward of the same loss, `grads_*`), the optimizer update alone (`tx.update` +
`apply_updates` on fixed gradients, `update_*`), the rule for C alone (`coeff_bucket_switch_sd`
against `coeff_sgd_sd`, SGD with momentum on the same C), and the SD step with the latent-STE update
of C instead of the bucket switch (`step_sd_latent`), so SD's extra cost splits into model and
optimizer. Their first calls (compilation for the new functions) are `breakdown_*_first_call_seconds`.

`--baseline=torch` also times, in the same alternation, the authors' PyTorch train step of the same
network (`experiments/torch_baseline.py`: SD ResNet-18, latent C re-quantized every forward with a
straight-through gradient, SGD on everything) on the same batch, and beside it the JAX SD step with
the same rule for C (`sd_latent`: `SDRules(mode="latent")`, `coeff_update="latent"`), so
`sd_latent_over_torch` compares like with like (`sd_over_torch`: the bucket-switch step). Models
without a PyTorch port, or a missing torch (`pip install -r requirements-bench.txt`), are skipped
with a message. `--xla_defaults` also times the SD latent step compiled with XLA's own options
instead of `make_steps`' platform defaults (on CPU: YNNPACK for dot products and reductions only, see
`sd_jax.train.step.CPU_COMPILER_OPTIONS`), alternating, as `sd_latent_over_xla_defaults`.
`--dtype=bfloat16` runs the JAX models in bfloat16 (variables stay float32).

Runs in about 2.5 minutes on the shared 2-core CPU (about 8 with --breakdown). The last line with
--json is one JSON object with one entry per model: dense_seconds, sd_seconds, sd_over_dense,
images_per_second (dense_images_per_second and sd_images_per_second, at the median step time),
compile times, the final losses, all timings, and the machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from experiments import benchmarking, torch_baseline
from experiments.benchmarking import report
from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SDRules
from sd_jax.train import sharding
from sd_jax.train.bucket_switch import bucket_switch
from sd_jax.train.optimizer import sd_optimizer, sgd
from sd_jax.train.step import TrainState, create_train_state, make_steps

MODELS = ("resnet20", "resnet18")  # CIFAR forms
BATCH = 128
_REPEATS = 5  # timed runs per function unless --repeats says otherwise
_LR = flags.DEFINE_float("lr", 0.01, "Constant learning rate of both optimizers.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time gradients and optimizer update apart.")
_BASELINE = flags.DEFINE_enum("baseline", "none", ["none", "torch"],
                              "Also time the authors' PyTorch step of the same network (SD ResNet-18).")
_XLA_DEFAULTS = flags.DEFINE_bool(
    "xla_defaults", False, "Also time the SD latent step compiled with XLA's own defaults instead of "
    "make_steps' platform options (sd_jax.train.step.default_compiler_options), alternating with it.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the JAX models.")

NUM_CLASSES = 10
SIDE = 32


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


class Side:
    """One model + optimizer: its donating train step and the state it carries from call to call."""

    def __init__(self, name: str, batch: dict[str, jax.Array], sd: SDRules | bool, coeff_update: str, lr: float,
                 dtype: str = "float32", compiler_options: dict[str, Any] | None = None):
        self.model = models.get(name, num_classes=NUM_CLASSES, sd=sd, dtype=jnp.dtype(dtype))
        variables = synthetic_variables(self.model, batch["image"])
        self.lr = lr
        self.tx = sd_optimizer(lr, coeff_update=coeff_update)
        state = create_train_state(self.model.apply, variables, self.tx, jax.random.key(0))
        self.mesh = sharding.data_mesh(jax.devices()[:1])
        self.train, _, self.state = make_steps(self.mesh, state, compiler_options=compiler_options)
        self.batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        self.loss = float("nan")

    def step(self) -> TrainState:
        """One train step; the donated state is replaced by the one it returns."""
        self.state, metrics = self.train(self.state, self.batch)
        self.loss = metrics["loss"]
        return self.state

    def parts(self) -> dict[str, Callable[[], Any]]:
        """The step's two halves, jitted apart (not donating): gradients, and the optimizer update."""
        state, batch = self.state, self.batch

        @jax.jit
        def grads(trainable, frozen):
            def loss_fn(trainable):
                logits, updates = state.apply_fn({**trainable, **frozen}, batch["image"], train=True,
                                                 mutable=["batch_stats", "sd_quant"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), updates

            return jax.grad(loss_fn, has_aux=True)(trainable)

        @jax.jit
        def update(gradients, opt_state, trainable):
            changes, opt_state = self.tx.update(gradients, opt_state, trainable)
            return optax.apply_updates(trainable, changes), opt_state

        fixed_grads, _ = grads(state.trainable, state.frozen)
        functions = {
            "grads": lambda: grads(self.state.trainable, self.state.frozen),
            "update": lambda: update(fixed_grads, self.state.opt_state, self.state.trainable),
        }
        if "sd_coeff" in state.trainable:  # the rule for C alone: bucket switch against plain SGD
            for label, tx in (("coeff_bucket_switch", bucket_switch(self.lr)), ("coeff_sgd", sgd(self.lr))):
                functions[label] = self._coeff_update(tx, fixed_grads["sd_coeff"])
        return functions

    def _coeff_update(self, tx: optax.GradientTransformation, coeff_grads: Any) -> Callable[[], Any]:
        coeff = jax.tree.map(jnp.copy, self.state.trainable["sd_coeff"])  # the state's own copy is donated
        opt_state = tx.init(coeff)

        @jax.jit
        def update(gradients, opt_state, coeff):
            changes, opt_state = tx.update(gradients, opt_state, coeff)
            return optax.apply_updates(coeff, changes), opt_state

        return lambda: update(coeff_grads, opt_state, coeff)


def _alternate(functions: dict[str, Callable[[], Any]], repeats: int, result: dict[str, Any],
               first_call: str = "{}_compile_seconds") -> dict[str, float]:
    """Call each function once (compilation; its time recorded under `first_call`), then time them in
    turn `repeats` times; their medians."""
    for label, fn in functions.items():
        result[first_call.format(label)] = _seconds(fn)
    times: dict[str, list[float]] = {label: [] for label in functions}
    for _ in range(repeats):
        for label, fn in functions.items():
            times[label].append(_seconds(fn))
    result.setdefault("all_seconds", {}).update({k: [round(t, 4) for t in v] for k, v in times.items()})
    return {label: statistics.median(values) for label, values in times.items()}


def _torch_step(name: str, batch: dict[str, jax.Array], lr: float) -> torch_baseline.TorchStep | None:
    """The PyTorch step of `name` on the same batch, or None (with a message) when there is none."""
    if not torch_baseline.available():
        print("torch baseline skipped: torch is not installed (pip install -r requirements-bench.txt)", flush=True)
        return None
    if name not in torch_baseline.MODELS:
        print(f"torch baseline skipped for {name}: no PyTorch port (ports: {', '.join(torch_baseline.MODELS)})",
              flush=True)
        return None
    images, labels = jax.device_get((batch["image"], batch["label"]))
    return torch_baseline.TorchStep(name, images, labels, NUM_CLASSES, lr)


def bench_model(name: str, batch_size: int, repeats: int, lr: float, breakdown: bool, baseline: str = "none",
                dtype: str = "float32", xla_defaults: bool = False) -> dict[str, Any]:
    """Alternating dense / SD train-step timings of one model (and the PyTorch step with
    `baseline="torch"`); medians, ratios, throughput, compile times."""
    key_x, key_y = jax.random.split(jax.random.key(1))
    batch = {"image": jax.random.normal(key_x, (batch_size, SIDE, SIDE, 3), jnp.float32),
             "label": jax.random.randint(key_y, (batch_size,), 0, NUM_CLASSES)}
    pow2 = SDRules(mode="pow2")
    sides = {"dense": Side(name, batch, False, "bucket_switch", lr, dtype),
             "sd": Side(name, batch, pow2, "bucket_switch", lr, dtype)}
    functions = {side: s.step for side, s in sides.items()}
    torch_step = _torch_step(name, batch, lr) if baseline == "torch" else None
    latent = SDRules(mode="latent")
    if torch_step is not None or xla_defaults:
        sides["sd_latent"] = Side(name, batch, latent, "latent", lr, dtype)
        functions["sd_latent"] = sides["sd_latent"].step
    if xla_defaults:
        sides["sd_latent_xla_defaults"] = Side(name, batch, latent, "latent", lr, dtype, compiler_options={})
        functions["sd_latent_xla_defaults"] = sides["sd_latent_xla_defaults"].step
    if torch_step is not None:
        functions["torch"] = torch_step.step
    result: dict[str, Any] = {}
    median = _alternate(functions, repeats, result)
    result.update(
        dense_seconds=median["dense"], sd_seconds=median["sd"], sd_over_dense=median["sd"] / median["dense"],
        images_per_second={side: batch_size / seconds for side, seconds in median.items()},
        dense_images_per_second=batch_size / median["dense"], sd_images_per_second=batch_size / median["sd"],
        final_loss={side: float(s.loss) for side, s in sides.items()},
        batch=batch_size, dtype=dtype, repeats=repeats, lr=lr, sd_mode="pow2", sd_coeff_update="bucket_switch",
    )
    if xla_defaults:
        result["sd_latent_over_xla_defaults"] = median["sd_latent"] / median["sd_latent_xla_defaults"]
    if torch_step is not None:
        result.update(
            torch_seconds=median["torch"], sd_latent_seconds=median["sd_latent"],
            sd_latent_over_torch=median["sd_latent"] / median["torch"], sd_over_torch=median["sd"] / median["torch"],
            dense_over_torch=median["dense"] / median["torch"], **torch_step.describe(),
        )
        result["final_loss"]["torch"] = torch_step.loss
    if breakdown:
        latent_update = Side(name, batch, pow2, "latent", lr, dtype)
        functions = {"step_dense": sides["dense"].step, "step_sd": sides["sd"].step,
                     "step_sd_latent": latent_update.step}
        for side in ("dense", "sd"):
            functions.update({f"{part}_{side}": fn for part, fn in sides[side].parts().items()})
        parts = _alternate(functions, repeats, result, first_call="breakdown_{}_first_call_seconds")
        result["breakdown_seconds"] = parts
        result["breakdown_sd_over_dense"] = {
            "step": parts["step_sd"] / parts["step_dense"],
            "step_latent": parts["step_sd_latent"] / parts["step_dense"],
            "grads": parts["grads_sd"] / parts["grads_dense"],
            "update": parts["update_sd"] / parts["update_dense"],
            "coeff_bucket_switch_over_sgd": parts["coeff_bucket_switch_sd"] / parts["coeff_sgd_sd"],
        }
    return result


def main(argv: list[str]) -> None:
    del argv
    results = {}
    for name in benchmarking.models(MODELS):
        r = results[name] = bench_model(name, benchmarking.batch(BATCH), benchmarking.repeats(_REPEATS), _LR.value,
                                        _BREAKDOWN.value, _BASELINE.value, _DTYPE.value, _XLA_DEFAULTS.value)
        print(f"{name}: train step dense {r['dense_seconds']:.4f} s ({r['dense_images_per_second']:.0f} img/s), "
              f"SD {r['sd_seconds']:.4f} s ({r['sd_images_per_second']:.0f} img/s), SD/dense {r['sd_over_dense']:.3f}; "
              f"compile dense {r['dense_compile_seconds']:.1f} s, SD {r['sd_compile_seconds']:.1f} s", flush=True)
        if "torch_seconds" in r:
            print(f"{name}: PyTorch SD step {r['torch_seconds']:.4f} s ({r['torch_threads']} threads); JAX SD latent "
                  f"{r['sd_latent_seconds']:.4f} s, JAX/PyTorch {r['sd_latent_over_torch']:.3f} "
                  f"(bucket-switch SD/PyTorch {r['sd_over_torch']:.3f})", flush=True)
        if "sd_latent_over_xla_defaults" in r:
            print(f"{name}: SD latent step with make_steps' options / with XLA's defaults "
                  f"{r['sd_latent_over_xla_defaults']:.3f}", flush=True)
        if "breakdown_seconds" in r:
            print(f"{name} breakdown (s): " + ", ".join(f"{k} {v:.4f}" for k, v in r["breakdown_seconds"].items())
                  + "; SD/dense " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_sd_over_dense"].items()),
                  flush=True)
    report(results, as_json=benchmarking.JSON.value)


if __name__ == "__main__":
    app.run(main)
