"""The one trainer: data, model, optimizer, sharded steps, checkpoints and metrics for a config.

`train_and_evaluate(config, workdir)` trains the model the config names (dense, or SD with
`model.sd`) from scratch or from `init.from_params` (a dense checkpoint is decomposed on the way in
when the model is SD, with the per-layer settings of a storage target (`sd.target_compression`,
`sd.target_bytes`) chosen on its kernels and written to the workdir as `sd_allocation.json`;
`init.reset` re-initialises matching layers, e.g. the classifier), resuming from
the latest good checkpoint in `workdir` when there is one (a finished run with its `summary.json` says
so and returns that summary). `workdir` is any path `etils.epath` reaches (a
local folder, gs://...). The run describes itself there (`config.json`, and the command line and the
commit in `run.json`), writes TensorBoard events and `metrics.jsonl` (loss, accuracy, learning rate,
for an SD model the compressibility of C (`optim.compressibility_weight` weighs it in the loss, see
`sd_jax.core.compressibility`); at each evaluation its figures and, for SD and projected models, the
density of C), prints progress
lines (stage, step of total, images/s, ETA) and each evaluation's result, and returns a summary (also
written to `summary.json`); all of that from process 0 only (`sd_jax.train.workdir`), while every
process takes part in Orbax's checkpoints. A non-finite loss stops the run with a message; the last
good checkpoint stays.
`evaluate(config, workdir)` restores the latest checkpoint and evaluates it.

Evaluation: after every epoch (every `eval.every_steps` steps when set) and at the end, the model is
evaluated on the eval split; `eval_loss`, `eval_accuracy` and `epoch` (for a text dataset also
`eval_bits_per_char`, and `bits_per_char` in the summary; accuracy is then next-character accuracy)
go to metrics.jsonl and TensorBoard, and a checkpoint carrying that accuracy is saved, so the best one is kept
(`ckpt.keep_best`). The summary holds the final `accuracy` and `loss`, and `best_accuracy` with its
`best_step`; a resumed run reads the best so far back from its checkpoint.

SWA (`swa.start_epoch` > 0, docs/method.md 1.6): after each epoch from the start epoch on, the average so
far (one set of weights per epoch) is put in SD form, its batch-norm statistics are recomputed over an
epoch of training batches (`swa.bn_batches`) and it is evaluated (`swa_eval_loss`,
`swa_eval_accuracy`; summary `best_swa_accuracy`, `best_swa_step`). The last average is the result
of the run: the final checkpoint and the summary's `accuracy`.

Projection (`optim.project_every_epoch`, a dense model; the authors' inference-only rule,
SmartDeal-Inference/main.py): after each epoch every kernel the `sd` rules select is replaced by the
reconstruction C·B of its decomposition with the `sd` options (`sd_jax.train.projection`), before the
evaluation, so every accuracy the run reports (final and best) is of projected weights, and training
goes on from them. With SWA the average is taken and its batch-norm statistics recomputed as above,
then its kernels are projected too, and the projected average is the one later epochs average into (the
authors' SWA model is overwritten by its projection). The summary counts the storage of the last
projection as SD storage (density of C, compression), as for an SD model.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from sd_jax import data, models
from sd_jax.core import pow2
from sd_jax.core import report as decomposition_report
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import NetworkDecomposition
from sd_jax.models.common import BN_MOMENTUM
from sd_jax.nn import allocate, convert
from sd_jax.nn import report as sd_report
from sd_jax.nn.layers import QUANTIZER_OPTIONS, SD_COEFF, low_precision_factories
from sd_jax.nn.rules import SDRules
from sd_jax import io as sd_io
from sd_jax.train import projection, schedules, sharding, swa, workdir as run_files
from sd_jax.train.config_check import check_config, check_training_config
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.progress import Progress, duration
from sd_jax.train import step as step_lib
from sd_jax.train.step import TrainState, create_train_state, eval_figures, make_steps
from sd_jax.train.train_checkpoint import TrainCheckpoints


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def _pipelines(config: ml_collections.ConfigDict) -> tuple[data.Pipeline, data.Pipeline]:
    """Training and evaluation pipelines; with `input.placement` "device" (or "auto" and the split fits
    `input.device_bytes` per device) a fixed-size split is held on the devices of the run's mesh."""
    common = dict(setting=config.input.setting, part=config.input.part, split_seed=config.input.split_seed,
                  split_rule=config.input.split_rule, data_dir=config.input.data_dir or None,
                  num_threads=config.input.decode_threads, placement=config.input.placement,
                  device_bytes=config.input.device_bytes, mesh=sharding.data_mesh(), data_axis=sharding.DATA)
    train = data.input_pipeline(config.input.dataset, "train", batch_size=config.input.batch_size,
                                seed=config.seed, **common)
    evaluation = data.input_pipeline(config.input.dataset, "eval", batch_size=config.input.eval_batch_size,
                                     seed=config.seed, **common)
    return train, evaluation


def _model(config: ml_collections.ConfigDict, num_classes: int, rules: SDRules) -> Any:
    """The model the config names: SD layers by `rules` (the run's, `_run_rules`), or dense; a dense model
    with `sd.activation_bits` / `sd.gradient_bits` set gets the SD layers' low-precision numerics (the
    dense 8-bit baseline of the paper's training claims). `sd.stored_activation_bits` also goes to the
    model itself where it has that option (its batch norms and ReLUs, `sd_jax.nn.batch_norm`)."""
    options = {**models.stored_activation_options(config.model.name, config.sd.get("stored_activation_bits")),
               **config.model.options.to_dict()}
    if config.model.sd:
        return models.get(config.model.name, num_classes=num_classes, sd=rules, **options)
    if not any(config.sd.get(key) for key in ("activation_bits", "gradient_bits", "stored_activation_bits")):
        return models.get(config.model.name, num_classes=num_classes, **options)
    layers = low_precision_factories(**{key: config.sd[key] for key in QUANTIZER_OPTIONS if key in config.sd})
    return models.get(config.model.name, num_classes=num_classes, **layers, **options)


def _run_rules(config: ml_collections.ConfigDict, workdir: epath.Path, progress: Progress) -> SDRules:
    """The SD rules of the run: the config's; with a storage target, the per-layer allocation for it
    (`sd_jax.nn.allocate`) on the dense kernels of `init.from_params` placed first, chosen on the first
    start and written to the workdir (`sd_allocation.json`, reusable as `sd.rules` by `read_rules`), read
    back from there when the run resumes, so a resumed run decomposes and trains exactly as it began."""
    rules = SDRules.from_config(config)
    target = SDRules.target_of(config)
    if target is None or not config.model.sd:
        return rules
    path = workdir / allocate.ALLOCATION_FILE
    if path.exists():
        written = allocate.read_target(str(path))
        if written != target:
            raise ValueError(f"{path} holds the allocation for {written.describe()}, not the config's "
                             f"{target.describe()}; pass a fresh --workdir, or the target it was started with")
        return allocate.placed_first(allocate.read_rules(str(path)), rules)
    loaded = models.upgrade_layout(sd_io.load_variables(config.init.from_params))
    if SD_COEFF in loaded:
        raise ValueError(f"init.from_params={config.init.from_params} holds SD variables, but sd.{target.describe()} "
                         "chooses its thresholds on dense kernels; pass a dense checkpoint")
    progress.report(f"allocate: thresholds ({SDRules.method_of(config)}) for {target.describe()} on the dense "
                    f"kernels of {config.init.from_params}")
    found = allocate.targeted_rules(config, loaded["params"])[1]
    progress.report(f"allocate: estimated compression {found.estimated:.2f}x; the rules go to {path}")
    if run_files.reports():
        workdir.mkdir(parents=True, exist_ok=True)
        run_files.write_text(path, found.to_json())
    return found.sd_rules(rules)


def _smallest_magnitude(config: ml_collections.ConfigDict, threshold: float) -> float:
    """The smallest non-zero |C| of a layer decomposed with `threshold`, resolved once and handed to the
    bucket switch and SWA alike: `pow2.min_coeff(threshold)` (the value the threshold rounds to, as the
    layers quantize), or the reference's smallest power of two >= threshold (`optim.revive_at='ceil'`)."""
    if config.optim.revive_at == "ceil" and threshold > 0:
        return pow2.ceil_pow2(threshold)
    return pow2.min_coeff(threshold)


def _smallest_of(config: ml_collections.ConfigDict, rules: SDRules) -> Callable[[str], float]:
    """The smallest magnitude of each coefficient tensor, by its path ('sd_coeff/<layer>/coeff', or
    '<layer>/coeff' within the collection): that of its layer's threshold under `rules`."""
    def smallest(path: str) -> float:
        layer = path.removeprefix(f"{SD_COEFF}/").removesuffix("/coeff")
        return _smallest_magnitude(config, rules.threshold_of(layer))
    return smallest


def _schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    if config.optim.schedule == "reference":
        swa_on = config.swa.start_epoch > 0
        return schedules.reference_schedule(config.optim.lr, config.optim.epochs, steps_per_epoch=steps_per_epoch,
                                            swa_start=config.swa.start_epoch if swa_on else None,
                                            swa_lr=config.swa.lr if swa_on else None)
    if config.optim.schedule == "cosine":
        return schedules.cosine_schedule(config.optim.lr, config.optim.epochs * steps_per_epoch,
                                         warmup_steps=config.optim.warmup_steps)
    if config.optim.schedule == "step":
        return schedules.step_schedule(config.optim.lr, step_epochs=config.optim.step_epochs,
                                       factor=config.optim.step_factor, steps_per_epoch=steps_per_epoch)
    raise ValueError(f"optim.schedule={config.optim.schedule!r}; pass 'reference', 'cosine' or 'step'")


def _initial_variables(config, model, rules: SDRules, sample, key, from_checkpoint: bool, progress: Progress
                       ) -> dict[str, Any]:
    """Fresh variables, or those of `init.from_params`: an SD checkpoint as it is, a dense one as it is
    for a dense model or decomposed (`to_sd`, the "decompose" stage) for an SD model. Layers whose name
    matches `init.reset` (e.g. the classifier, for the adaptation setting) keep their fresh values.

    When resuming (`from_checkpoint` False) the fresh variables only serve as the restore template.
    """
    fresh = flax.core.unfreeze(jax.jit(lambda k: model.init(k, sample, train=False))(key))
    if not config.init.from_params or not from_checkpoint:
        return fresh
    loaded = models.upgrade_layout(sd_io.load_variables(config.init.from_params))
    sd_io.check_finite(loaded, config.init.from_params)
    loaded = {name: tree for name, tree in loaded.items() if name in fresh}
    if config.model.sd and "sd_coeff" not in loaded:
        loaded = _decompose(loaded, rules, config.init.from_params, progress)
    if "sd_quant" in fresh and "sd_quant" not in loaded:  # low-precision ranges start fresh
        loaded["sd_quant"] = fresh["sd_quant"]
    if config.init.reset:
        loaded = _reset_layers(fresh, loaded, re.compile(config.init.reset))
    sd_io.check_fits(fresh, loaded, config.init.from_params, what="the checkpoint does not fit the model",
                     fix="pass the checkpoint of the same model and number of classes")
    return loaded


def _decompose(variables: dict[str, Any], rules: SDRules, source: str, progress: Progress) -> dict[str, Any]:
    """`variables` of a dense model in SD form (`convert.to_sd`), saying so as it starts and ends."""
    progress.report(f"decompose: the dense kernels of {source} into SD form (W = C·B, C sparse powers of two)")
    start = time.perf_counter()
    variables, decomposition = convert.to_sd(variables, rules)
    totals = decomposition_report.totals(decomposition.reports, decomposition.dense_params)
    progress.report(f"decompose: {totals['decomposed_tensors']} kernels in {duration(time.perf_counter() - start)}, "
                    f"density of C {totals['density']:.3f}, compression {totals['compression']:.2f}x")
    return variables


def _reset_layers(fresh: dict[str, Any], loaded: dict[str, Any], pattern: re.Pattern) -> dict[str, Any]:
    """`loaded` with the variables of every layer whose name (`head/dense`) `pattern` matches taken from
    `fresh`, in the collections `loaded` has."""
    matches = lambda path: pattern.search("/".join(path[1:-1])) is not None
    flat = {path: leaf for path, leaf in flax.traverse_util.flatten_dict(loaded).items() if not matches(path)}
    flat.update({path: leaf for path, leaf in flax.traverse_util.flatten_dict(fresh).items()
                 if path[0] in loaded and matches(path)})
    return flax.traverse_util.unflatten_dict(flat)


def _global_batch(batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
    """A batch as global arrays split over the mesh: host rows put there, device-made batches as they are."""
    target = sharding.batch_sharding(mesh)
    return {key: value if isinstance(value, jax.Array) else jax.make_array_from_process_local_data(target, value)
            for key, value in batch.items()}


def _fetch(tree: Any) -> Any:
    """Host copies of (possibly multi-process, possibly sharded) global arrays."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _evaluate(evaluate_step, state: TrainState, pipeline: data.Pipeline, mesh, progress: Progress,
              stage: str = "eval") -> dict[str, float]:
    """Loss and accuracy over the whole eval split, shown as stage `stage` while it runs; for text, with
    the loss in bits per character (`bits_per_char`: loss / ln 2, the loss being nats per byte)."""
    pipeline.set_state({"epoch": 0, "step": 0, "fingerprint": pipeline.get_state()["fingerprint"]})
    totals = np.zeros(3)
    for _ in progress.track(stage, range(pipeline.steps_per_epoch), pipeline.steps_per_epoch):
        out = _fetch(evaluate_step(state, _global_batch(next(pipeline), mesh)))
        totals += [out["loss_sum"], out["correct"], out["count"]]
    return eval_figures(*totals, text=pipeline.spec.task == "language_model")


def _storage(model: Any, state: TrainState, sample: jax.Array,
             decomposition: NetworkDecomposition | None = None) -> dict[str, float]:
    """Density of C and compression against 32-bit weights (docs/method.md 1.5) of the coefficients the
    SD layers use (latent ones quantized as the layers quantize them) over the real kernel entries;
    other parameters (biases, batch norm, kernels left dense) count 32 bits on both sides, as in the
    analyzer's storage ratio. A dense model whose kernels are C·B of `decomposition` (the last
    projection) counts as that SD model."""
    if decomposition is not None:
        tree = decomposition.tree
    elif "sd_coeff" in state.trainable:
        tree = convert.sd_tree(model, _fetch(state.variables), sample, train=False)
    else:
        return {"density": 1.0, "compression_ratio": 1.0}
    totals = sd_report.model_report(tree).totals()
    is_decomposition = lambda leaf: isinstance(leaf, Decomposition)
    other_bits = 32 * sum(int(np.size(x)) for x in jax.tree.leaves(tree, is_leaf=is_decomposition)
                          if not is_decomposition(x))
    return {"density": totals["density"],
            "compression_ratio": (32 * totals["sd_params"] + other_bits) / (totals["sd_storage_bits"] + other_bits)}


def _stop(step: int, loss: float, checkpoints: TrainCheckpoints, *, evaluation: bool = False) -> None:
    """Raise TrainingError for a non-finite loss at training step `step`, first dropping the checkpoint of
    step - 1 (the state that loss came from), so that the latest checkpoint left is a good one; with
    `evaluation`, for that of the evaluation after step `step` (whose state is not saved)."""
    checkpoints.wait()
    if not evaluation and checkpoints.latest_step() == step - 1:
        checkpoints.delete(step - 1)
    last = checkpoints.latest_step()
    where = (f"the last good checkpoint is in {checkpoints.directory} (step {last})" if last is not None
             else "no checkpoint was saved before it (lower ckpt.every_steps to keep one)")
    what = f"eval loss is {loss} after step {step}" if evaluation else f"loss is {loss} at step {step}"
    raise TrainingError(f"{what}; stopped; {where}; lower optim.lr and rerun")


class _Run(NamedTuple):
    """What `_build` makes of a config: everything a run needs but its train state."""

    config: ml_collections.ConfigDict
    rules: SDRules  # the SD rules of the run (`_run_rules`)
    train_data: data.Pipeline
    eval_data: data.Pipeline
    mesh: Any
    checkpoints: TrainCheckpoints
    total_steps: int
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    model: Any
    sample: jax.Array
    schedule: optax.Schedule


def _build(config: ml_collections.ConfigDict, workdir: epath.Path, progress: Progress) -> tuple[_Run, TrainState]:
    """The run and its state (restored when the workdir has a checkpoint)."""
    train_data, eval_data = _pipelines(config)
    mesh = sharding.data_mesh()
    sharding.check_batch(config.input.batch_size, mesh)
    total_steps = (config.optim.stop_epoch or config.optim.epochs) * train_data.steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"optim.epochs={config.optim.epochs} gives no training step; pass epochs >= 1")
    rules = _run_rules(config, workdir, progress)
    model = _model(config, train_data.num_classes, rules)
    inputs = next(iter(eval_data))[eval_data.spec.input_key]
    sample = jnp.zeros((1,) + inputs.shape[1:], inputs.dtype)
    key = jax.random.key(config.seed)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", every_steps=config.ckpt.every_steps,
                                   keep_last=config.ckpt.keep_last, keep_best=config.ckpt.keep_best)
    resuming = checkpoints.latest_step() is not None
    variables = _initial_variables(config, model, rules, sample, key, from_checkpoint=not resuming,
                                   progress=progress)
    schedule = _schedule(config, train_data.steps_per_epoch)
    tx = sd_optimizer(schedule, momentum=config.optim.momentum,
                      weight_decay=config.optim.weight_decay, coeff_update=config.optim.coeff_update,
                      switch_bar=config.optim.switch_bar, update_threshold=config.optim.update_threshold,
                      threshold=config.sd.threshold, max_coeff=config.sd.max_coeff,
                      smallest=_smallest_of(config, rules),
                      reset_every=train_data.steps_per_epoch if config.optim.reset_counters_every_epoch else 0,
                      optimizer=config.optim.optimizer)
    if config.swa.start_epoch > 0:
        tx = optax.chain(tx, swa.swa(config.swa.start_epoch * train_data.steps_per_epoch,
                                     every=train_data.steps_per_epoch))
    state = create_train_state(model.apply, variables, tx, jax.random.fold_in(key, 1))
    if resuming:
        state, data_state = checkpoints.restore(state)
        train_data.set_state(data_state)
    train_step, eval_step, state = make_steps(mesh, state, shard_min_size=config.sharding.shard_min_size,
                                              compressibility_weight=config.optim.compressibility_weight,
                                              input_key=train_data.spec.input_key)
    run = _Run(config, rules, train_data, eval_data, mesh, checkpoints, total_steps, train_step, eval_step, model,
               sample, schedule)
    return run, state


def _stored_activation_memory(run: _Run, state: TrainState) -> dict[str, Any]:
    """The run's `stored_activation_bits` (None: exact) and `peak_memory_ratio`: the peak bytes of its
    compiled train step (`step_lib.step_memory`) over those of the same step with exact stored activations,
    compiled beside it before the first step (1.0 for an exact run, which compiles nothing more)."""
    bits = run.config.sd.get("stored_activation_bits") or None
    if bits is None:
        return {"stored_activation_bits": None, "peak_memory_ratio": 1.0}
    exact_config = copy.deepcopy(run.config)
    exact_config.sd.stored_activation_bits = None
    exact_rules = SDRules(run.rules.rules, max_kernel_size=run.rules.max_kernel_size,
                          **dict(run.rules.defaults, stored_activation_bits=None))
    exact_model = _model(exact_config, run.train_data.num_classes, exact_rules)
    size, placed = run.config.input.batch_size, sharding.batch_sharding(run.mesh)
    input_key = run.train_data.spec.input_key
    example = next(iter(run.eval_data))
    batch = {key: jax.ShapeDtypeStruct((size, *example[key].shape[1:]), example[key].dtype, sharding=placed)
             for key in (input_key, "label")}
    # One jit for both (the state's arrays carry their placement): make_steps' fixes the model.
    step = jax.jit(functools.partial(step_lib.train_step, input_key=input_key,
                                     compressibility_weight=run.config.optim.compressibility_weight),
                   donate_argnums=0, compiler_options=step_lib.default_compiler_options(run.mesh) or None)
    peak = step_lib.step_memory(step, state, batch)["peak_bytes"]
    exact_peak = step_lib.step_memory(step, state.replace(apply_fn=exact_model.apply), batch)["peak_bytes"]
    return {"stored_activation_bits": bits, "peak_memory_ratio": peak / exact_peak}


def _training_epoch(train_data: data.Pipeline, epoch: int, batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `batches` batches (0: all) of training epoch `epoch`, read by a second cursor over the
    training data, so that the training order does not move."""
    cursor = copy.copy(train_data)  # shares the decoded images
    cursor.set_state(dict(train_data.get_state(), epoch=epoch, step=0))
    for _ in range(batches or train_data.steps_per_epoch):
        yield next(cursor)


def _swa_model(config: ml_collections.ConfigDict, rules: SDRules, state: TrainState,
               bn_forward: Callable[..., Any], images: Iterable[jax.Array]) -> TrainState:
    """`state` with the SWA average in SD form (coefficients projected back to powers of two inside the
    mask) and, for batch norm, statistics recomputed over `images` by `bn_forward` (docs/method.md 1.6)."""
    trainable = dict(swa.find_state(state.opt_state).average)
    smallest = _smallest_of(config, rules)
    if "sd_coeff" in trainable:
        masks = flax.traverse_util.flatten_dict(state.frozen["sd_mask"])  # {(*layer, "mask"): mask}
        trainable["sd_coeff"] = flax.traverse_util.unflatten_dict({
            path: swa.project_coefficients(coeff, masks[(*path[:-1], "mask")],
                                           smallest=smallest("/".join(path)), max_coeff=config.sd.max_coeff)
            for path, coeff in flax.traverse_util.flatten_dict(trainable["sd_coeff"]).items()
        })
    state = state.replace(trainable=trainable)
    if "batch_stats" in state.frozen:
        stats = swa.recompute_batch_stats(bn_forward, state.variables, images, momentum=BN_MOMENTUM)
        state = state.replace(frozen={**state.frozen, "batch_stats": stats})
    return state


def _put_like(values: Any, like: Any) -> Any:
    """Host arrays `values` as global arrays placed and typed as `like` (a tree of the same structure)."""
    return jax.tree.map(lambda value, old: jax.make_array_from_callback(
        old.shape, old.sharding, lambda index: np.asarray(value, old.dtype)[index]), values, like)


def _projected(params: Any, rules: SDRules) -> tuple[Any, NetworkDecomposition]:
    """`params` (global arrays) with the kernels `rules` select projected onto SD form, placed as they
    were, and the decomposition they are C·B of (`projection.project`)."""
    projected, decomposition = projection.project(_fetch(params), rules)
    return _put_like(projected, params), decomposition


def _with_swa_average(opt_state: Any, average: Any) -> Any:
    """`opt_state` with the average of its one `swa.SWAState` replaced by `average`."""
    is_swa = lambda node: isinstance(node, swa.SWAState)
    return jax.tree.map(lambda node: node._replace(average=average) if is_swa(node) else node, opt_state,
                        is_leaf=is_swa)


def _keep_best(record: dict[str, Any], model: str, step: int, accuracy: float) -> dict[str, Any]:
    """`record` with best_{model}accuracy and best_{model}step updated by an evaluation at `step`
    (`model` "" for the trained model, "swa_" for the SWA average); the first of equal ones stays."""
    if accuracy > record.get(f"best_{model}accuracy", -math.inf):
        return dict(record, **{f"best_{model}accuracy": accuracy, f"best_{model}step": step})
    return record


class _Evaluated(NamedTuple):
    """What the evaluations of a run found so far."""

    record: dict[str, Any]  # best accuracies and their steps, saved with every checkpoint
    result: dict[str, float] | None = None  # the latest evaluation of the run's model
    decomposition: NetworkDecomposition | None = None  # what projected kernels are C·B of


def _swa_average(run: _Run, state: TrainState, step: int, bn_forward: Callable[..., Any],
                 project_rules: SDRules | None, progress: Progress) -> tuple[TrainState, TrainState, Any]:
    """The SWA average taken after `step` as a model to evaluate (`_swa_model`, batch norm recomputed
    over the epoch's first `swa.bn_batches` batches), with its kernels projected when `project_rules`
    are given; returns `state` (then averaging on from the projected average), that model and the
    projection's decomposition (None without projection)."""
    config, steps_per_epoch = run.config, run.train_data.steps_per_epoch
    batches = _training_epoch(run.train_data, step // steps_per_epoch - 1, config.swa.bn_batches)
    images = (_global_batch(batch, run.mesh)[run.train_data.spec.input_key] for batch in
              progress.track("swa batch norm", batches, config.swa.bn_batches or steps_per_epoch))
    swa_state = _swa_model(config, run.rules, state, bn_forward, images)
    if project_rules is None:
        return state, swa_state, None
    params, decomposition = _projected(swa_state.trainable["params"], project_rules)  # after the batch norm, as the authors
    average = {**swa_state.trainable, "params": params}
    state = state.replace(opt_state=_with_swa_average(state.opt_state, average))
    return state, swa_state.replace(trainable=average, opt_state=state.opt_state), decomposition


def _swa_taken(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
    """Whether an SWA average was just taken at `step` (the end of an epoch from swa.start_epoch on)."""
    return 0 < config.swa.start_epoch * steps_per_epoch <= step and step % steps_per_epoch == 0


def _bits_per_char(prefix: str, result: dict[str, float]) -> dict[str, float]:
    """{prefix + "bits_per_char": ...} for the evaluation of a text model, {} for an image model."""
    return {prefix + "bits_per_char": result["bits_per_char"]} if "bits_per_char" in result else {}


def _evaluation_line(figures: dict[str, float], record: dict[str, Any]) -> str:
    """One line of an evaluation's results for people."""
    line = (f"eval  epoch {figures['epoch']:g}: accuracy {figures['eval_accuracy']:.4f}, loss {figures['eval_loss']:.4f} "
            f"(best {record['best_accuracy']:.4f} at step {record['best_step']})")
    if "eval_bits_per_char" in figures:
        line += f", {figures['eval_bits_per_char']:.4f} bits per character"
    if "swa_eval_accuracy" in figures:
        line += f"; SWA accuracy {figures['swa_eval_accuracy']:.4f} (best {record['best_swa_accuracy']:.4f})"
    if "density" in figures:
        line += f"; density of C {figures['density']:.3f}, compression {figures['compression_ratio']:.2f}x"
    return line


def _evaluation_point(run: _Run, state: TrainState, step: int, evaluated: _Evaluated, *,
                      bn_forward: Callable[..., Any], project_rules: SDRules | None, writer: run_files.MetricsWriter,
                      progress: Progress) -> tuple[TrainState, _Evaluated]:
    """The work after a `step` that ends an evaluation period (an epoch, eval.every_steps, the last
    step): project the kernels (optim.project_every_epoch), evaluate, evaluate the SWA average just
    taken (at the last step it becomes the result), log and print the figures (with the density of C
    for an SD or projected model) and save a checkpoint that carries the accuracy."""
    decomposition = evaluated.decomposition
    if project_rules is not None:  # each evaluation is at the end of an epoch (checked in _build)
        params, decomposition = _projected(state.trainable["params"], project_rules)
        state = state.replace(trainable={**state.trainable, "params": params})
    result = _evaluate(run.eval_step, state, run.eval_data, run.mesh, progress)
    if not math.isfinite(result["loss"]):
        _stop(step, result["loss"], run.checkpoints, evaluation=True)
    record = _keep_best(evaluated.record, "", step, result["accuracy"])
    figures = {"epoch": step / run.train_data.steps_per_epoch, "eval_loss": result["loss"],
               "eval_accuracy": result["accuracy"], **_bits_per_char("eval_", result)}
    if _swa_taken(run.config, step, run.train_data.steps_per_epoch):
        state, swa_state, swa_decomposition = _swa_average(run, state, step, bn_forward, project_rules, progress)
        swa_result = _evaluate(run.eval_step, swa_state, run.eval_data, run.mesh, progress, stage="swa eval")
        record = _keep_best(record, "swa_", step, swa_result["accuracy"])
        figures.update(swa_eval_loss=swa_result["loss"], swa_eval_accuracy=swa_result["accuracy"],
                       **_bits_per_char("swa_eval_", swa_result))
        if step == run.total_steps:  # the SWA average is the result of the run
            state, result, decomposition = swa_state, swa_result, swa_decomposition
    if decomposition is not None or "sd_coeff" in state.trainable:
        figures.update(_storage(run.model, state, run.sample, decomposition))
    writer.write(step, figures)
    progress.report(_evaluation_line(figures, record))
    run.checkpoints.save(step, state, data_state=run.train_data.get_state(), evaluation=record,
                         metrics={"accuracy": result["accuracy"]}, force=True)
    return state, _Evaluated(record, result, decomposition)


def _log_step(run: _Run, step: int, first_step: int, metrics: dict[str, jax.Array], writer: run_files.MetricsWriter,
              progress: Progress) -> None:
    """Fetch the metrics of `step` where it is logged, or where its loss vouches for the checkpoint of
    step - 1 (the state that loss came from); stop on a non-finite loss; log with the learning rate."""
    logged = step % run.config.log_every == 0 or step == run.total_steps
    vouches = step - 1 > first_step and (step - 1) % run.config.ckpt.every_steps == 0
    if not (logged or vouches):
        return
    metrics = {name: float(value) for name, value in _fetch(metrics).items()}
    if not math.isfinite(metrics["loss"]):
        _stop(step, metrics["loss"], run.checkpoints)
    if logged:
        progress.update(step, loss=metrics["loss"], accuracy=metrics["accuracy"])
        writer.write(step, dict(metrics, learning_rate=float(run.schedule(step - 1)), steps_per_second=progress.rate))


def _summary(run: _Run, state: TrainState, evaluated: _Evaluated, seconds: float,
             memory: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: final and best figures, storage, stored activations and the peak memory of
    the train step (`_stored_activation_memory`), and what ran where."""
    config, record = run.config, evaluated.record
    best = {key: record[key] for key in ("best_accuracy", "best_step", "best_swa_accuracy", "best_swa_step")
            if key in record}
    return dict(accuracy=evaluated.result["accuracy"], loss=evaluated.result["loss"],
                **_bits_per_char("", evaluated.result), **best, steps=run.total_steps,
                seconds=seconds, **_storage(run.model, state, run.sample, evaluated.decomposition), **memory,
                dataset=config.input.dataset, model=config.model.name, sd=bool(config.model.sd),
                setting=config.setting or config.input.setting, recipe=config.recipe or None,
                part=config.input.part, epochs=config.optim.epochs,
                epochs_run=run.total_steps / run.train_data.steps_per_epoch,
                backend=jax.default_backend(), devices=jax.device_count(), cpus=os.cpu_count(),
                date=time.strftime("%Y-%m-%d"))


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Accuracy and loss of the latest checkpoint in `workdir` on the evaluation split."""
    check_config(config)
    progress = Progress(enabled=run_files.reports())
    run, state = _build(config, run_files.as_path(workdir), progress)
    try:
        if run.checkpoints.latest_step() is None:
            raise sd_io.CheckpointError(f"{workdir}: no checkpoint to evaluate; train first (--mode=train)")
        return _evaluate(run.eval_step, state, run.eval_data, run.mesh, progress)
    finally:
        run.checkpoints.close()
        progress.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or fine-tune) as `config` says; return the summary and, from process 0, write it."""
    check_training_config(config)
    start, workdir, reports = time.perf_counter(), run_files.as_path(workdir), run_files.reports()
    progress = Progress(enabled=reports)
    if reports:
        run_files.describe_run(workdir, config)
    run, state = _build(config, workdir, progress)
    first_step, steps_per_epoch = int(state.step), run.train_data.steps_per_epoch
    finished = run_files.read_json(workdir / run_files.SUMMARY_FILE) if first_step == run.total_steps else {}
    if finished:
        run.checkpoints.close()
        progress.report(f"{workdir} is complete (step {first_step} of {run.total_steps}); its summary from "
                        f"{run_files.SUMMARY_FILE} follows (a fresh --workdir trains anew)")
        progress.close()
        return finished
    memory = _stored_activation_memory(run, state)
    writer = run_files.MetricsWriter(workdir, enabled=reports, resume_step=first_step)
    eval_every = config.eval.every_steps or steps_per_epoch
    # Read before the steps donate `state`; the train steps fold in their step number, not 2^32 - 1.
    apply_fn, bn_key = state.apply_fn, jax.random.fold_in(state.key, 2**32 - 1)
    bn_forward = jax.jit(lambda variables, images: apply_fn(
        variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": bn_key}))
    evaluated = _Evaluated(run.checkpoints.evaluation(first_step) if first_step else {})
    project_rules = SDRules.from_config(config) if config.optim.project_every_epoch else None
    try:
        run.checkpoints.check_writable()
        progress.start("train", run.total_steps, done=first_step, images_per_step=config.input.batch_size)
        for step in range(first_step + 1, run.total_steps + 1):
            state, metrics = run.train_step(state, _global_batch(next(run.train_data), run.mesh))
            _log_step(run, step, first_step, metrics, writer, progress)
            if step % eval_every and step != run.total_steps and not _swa_taken(config, step, steps_per_epoch):
                if step % config.ckpt.every_steps == 0:
                    run.checkpoints.save(step, state, data_state=run.train_data.get_state(), evaluation=evaluated.record)
                continue
            state, evaluated = _evaluation_point(run, state, step, evaluated, bn_forward=bn_forward,
                                                 project_rules=project_rules, writer=writer, progress=progress)
            progress.start("train", run.total_steps, done=step, images_per_step=config.input.batch_size)
        if evaluated.result is None:  # finished before: report the final model of the checkpoint
            decomposition = None if project_rules is None else projection.project(  # its kernels are projected
                _fetch(state.trainable["params"]), project_rules)[1]
            result = _evaluate(run.eval_step, state, run.eval_data, run.mesh, progress)
            evaluated = evaluated._replace(result=result, decomposition=decomposition)
    finally:
        run.checkpoints.close()
        writer.close()
        progress.close()
    summary = _summary(run, state, evaluated, time.perf_counter() - start, memory)
    if reports:
        run_files.write_text(workdir / run_files.SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary
