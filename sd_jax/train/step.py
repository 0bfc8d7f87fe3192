"""Train state and the jitted, data-parallel train and eval steps.

Variables are split by collection: `trainable` (params, sd_basis, sd_coeff) goes through the
optimizer; `frozen` (batch_stats and sd_quant, the running activation ranges of low-precision SD
layers, updated by the forward pass, and sd_mask, never changed) does not.
With a `compressibility_weight` > 0 the train step adds that times the compressibility loss of C
(`sd_jax.core.compressibility`) to the cross-entropy it differentiates; for an SD model the step
reports the term as `compressibility` beside `loss` (the cross-entropy alone) whatever the weight.
`make_steps` jits both steps with `NamedSharding` on a "data" mesh: the batch is split over the
devices, the state is replicated and donated, so one program serves 1 device, 8 devices or several
processes. On CPU it compiles them with `CPU_COMPILER_OPTIONS` (see there why).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sd_jax.core.compressibility import mean_compressibility
from sd_jax.train import sharding
from sd_jax.train.optimizer import TRAINABLE

Batch = dict[str, jax.Array]

# XLA:CPU (jaxlib 0.10) hands convolutions, dot products, reductions and elementwise fusions to
# YNNPACK by default. Its convolutions, the kernel gradient above all, are slower than XLA's own
# (Eigen) ones on the CIFAR shapes: in one process, alternating, the SD ResNet-18 train step ran
# about 10 % faster with YNNPACK kept for dot products only. Reductions stay with YNNPACK: without
# it XLA rewrites each batch-norm statistic over (batch, height, width) into a strided
# reduce-window, about 8x slower on the ResNet-18 stage-1 shape, and the step about 6 % (BENCHMARKS.md,
# "Full train step").
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be sharded, donated and checkpointed."""

    step: jax.Array
    trainable: dict[str, Any]
    frozen: dict[str, Any]
    opt_state: Any
    key: jax.Array
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, Any]:
        return {**self.trainable, **self.frozen}


def create_train_state(
    apply_fn: Callable[..., Any], variables: dict[str, Any], tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Split `variables` into trainable and frozen collections and initialise the optimizer."""
    variables = flax.core.unfreeze(variables)
    trainable = {name: tree for name, tree in variables.items() if name in TRAINABLE}
    frozen = {name: tree for name, tree in variables.items() if name not in TRAINABLE}
    return TrainState(
        step=jnp.zeros([], jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable),
        key=key, apply_fn=apply_fn, tx=tx,
    )


def _metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Mean cross entropy and accuracy over every label: one per image, or one per position of a text."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def coefficient_pairs(variables: dict[str, Any]) -> list[tuple[jax.Array, jax.Array]]:
    """(C, mask) of every SD layer in `variables` (the `sd_coeff` and `sd_mask` collections), paired by layer."""
    masks = flax.traverse_util.flatten_dict(variables.get("sd_mask", {}))  # {(*layer, "mask"): mask}
    return [(coeff, masks[(*path[:-1], "mask")])
            for path, coeff in flax.traverse_util.flatten_dict(variables.get("sd_coeff", {})).items()]


def train_step(state: TrainState, batch: Batch, compressibility_weight: float = 0.0, input_key: str = "image"
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on the global batch; returns the new state and mean loss and accuracy (and, for an
    SD model, the compressibility of C before the step). The step minimises the cross-entropy plus
    `compressibility_weight` times the compressibility; at 0 the term is not differentiated at all.
    The model takes `batch[input_key]` ("image", or "tokens" for text, `DatasetSpec.input_key`)."""
    dropout_key, quant_key = jax.random.split(jax.random.fold_in(state.key, state.step))
    rngs = {"dropout": dropout_key, "quant": quant_key}  # quant: stochastic rounding of SD layers' gradients

    def loss_fn(trainable):
        logits, updates = state.apply_fn(
            {**trainable, **state.frozen}, batch[input_key], train=True, mutable=["batch_stats", "sd_quant"],
            rngs=rngs,
        )
        metrics = _metrics(logits, batch["label"])
        objective = metrics["loss"]
        if "sd_coeff" in trainable:
            metrics["compressibility"] = mean_compressibility(coefficient_pairs({**trainable, **state.frozen}))
            if compressibility_weight:
                objective = objective + compressibility_weight * metrics["compressibility"]
        return objective, (metrics, updates)

    (_, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    changes, opt_state = state.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, changes)
    frozen = {**state.frozen, **updates}
    return state.replace(step=state.step + 1, trainable=trainable, frozen=frozen, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: Batch, input_key: str = "image") -> dict[str, jax.Array]:
    """Sums of loss and correct predictions, and the count of labels (examples, or text positions), in
    evaluation mode on `batch[input_key]`.

    A batch may carry a boolean "mask" (b,) (False on the padding of the last evaluation batch).
    """
    logits = state.apply_fn(state.variables, batch[input_key], train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape[:1], bool)).reshape(labels.shape[:1] + (1,) * (labels.ndim - 1))
    weight = jnp.broadcast_to(mask, labels.shape).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weight), "correct": jnp.sum(correct * weight), "count": jnp.sum(weight)}


def step_memory(step: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Bytes XLA assigns to one call of the jitted `step` on `args` (arrays or jax.ShapeDtypeStruct),
    from the compiled program's memory analysis: arguments, outputs, the outputs that alias donated
    arguments, temporaries, and `peak_bytes` = arguments + outputs - aliased + temporaries."""
    stats = step.lower(*args).compile().memory_analysis()
    figures = dict(argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
                   alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes)
    figures["peak_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"]
                             + figures["temp_bytes"])
    return figures


def eval_figures(loss_sum: float, correct: float, count: float, *, text: bool = False) -> dict[str, float]:
    """Mean loss and accuracy from the sums of `eval_step` over a split; for `text`, also the loss in bits
    per character (`bits_per_char`: the loss, nats per byte, over ln 2)."""
    figures = {"loss": float(loss_sum / count), "accuracy": float(correct / count)}
    if text:
        figures["bits_per_char"] = figures["loss"] / math.log(2)
    return figures


@functools.cache
def _cpu_options_known() -> bool:
    """Whether this jaxlib's XLA:CPU takes CPU_COMPILER_OPTIONS (another version may name them otherwise)."""
    try:
        one = jax.device_put(1.0, jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1).lower(one).compile(compiler_options=CPU_COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:
        return False
    return True


def default_compiler_options(mesh: Mesh) -> dict[str, Any]:
    """The XLA options `make_steps` compiles with on `mesh`'s platform: CPU_COMPILER_OPTIONS on CPU
    (where this jaxlib knows them), none elsewhere."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    return dict(CPU_COMPILER_OPTIONS) if on_cpu and _cpu_options_known() else {}


def make_steps(mesh: Mesh, state: TrainState, shard_min_size: int = 0,
               compiler_options: dict[str, Any] | None = None, compressibility_weight: float = 0.0,
               input_key: str = "image") -> tuple[Callable, Callable, TrainState]:
    """Jitted train and eval steps for `mesh`, and `state` placed on it: replicated, except that
    with `shard_min_size` > 0 arrays of at least that many entries (large kernels and their
    optimizer buffers) are split over "data" along their last axis (`sharding.shard_large`).
    `compiler_options`: XLA options of both steps; None: `default_compiler_options(mesh)`, {}: XLA's
    own defaults. `compressibility_weight`: the weight of the compressibility loss (`train_step`).
    `input_key`: the batch entry the model takes ("image" or "tokens")."""
    if compiler_options is None:
        compiler_options = default_compiler_options(mesh)
    replicated = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    if shard_min_size > 0:
        state_sharding = sharding.shard_large(state, mesh, min_size=shard_min_size)
    else:
        state_sharding = jax.tree.map(lambda _: replicated, state)
    # Through host values and a jitted identity, so that with several processes every process
    # contributes its (identical) copy to one global, replicated state.
    host = jax.device_get(state.replace(key=jax.random.key_data(state.key)))
    state = jax.jit(lambda s: s.replace(key=jax.random.wrap_key_data(s.key)), out_shardings=state_sharding)(host)
    train = jax.jit(functools.partial(train_step, compressibility_weight=compressibility_weight,
                                      input_key=input_key),
                    in_shardings=(state_sharding, batch), out_shardings=(state_sharding, replicated),
                    donate_argnums=0, compiler_options=compiler_options or None)
    evaluate = jax.jit(functools.partial(eval_step, input_key=input_key), in_shardings=(state_sharding, batch),
                       out_shardings=replicated, compiler_options=compiler_options or None)
    return train, evaluate, state
