import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax import models
from sd_jax.core import pow2
from sd_jax.core.compressibility import mean_compressibility
from sd_jax.nn.rules import SDRules
from sd_jax.train import sharding
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.step import coefficient_pairs, create_train_state, make_steps, train_step


class _Tiny(nn.Module):
    features: int = 8

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(self.features, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(10, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _setup(devices, shard_min_size=0, features=8):
    model = _Tiny(features)
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
    batch = {"image": images, "label": jnp.arange(16) % 10}
    variables = model.init(jax.random.key(0), images[:1], train=False)
    state = create_train_state(model.apply, variables, sd_optimizer(0.1), jax.random.key(2))
    mesh = sharding.data_mesh(devices)
    train, evaluate, state = make_steps(mesh, state, shard_min_size=shard_min_size)
    return train, evaluate, state, jax.device_put(batch, sharding.batch_sharding(mesh))


@pytest.mark.parametrize("shard_min_size", [0, 64])
def test_step_on_eight_devices_equals_one_device(shard_min_size):
    assert len(jax.devices()) == 8, "conftest simulates 8 CPU devices"
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        train, evaluate, state, batch = _setup(devices, shard_min_size)
        for _ in range(2):
            state, metrics = train(state, batch)
        if shard_min_size and len(devices) == 8:  # the 3x3x3x8 conv kernel (216 entries) is split 8 ways
            assert state.trainable["params"]["conv"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
                None, None, None, "data")
        results.append((jax.device_get(state.variables), jax.device_get(metrics), jax.device_get(evaluate(state, batch))))
    (one, one_metrics, one_eval), (eight, eight_metrics, eight_eval) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one, eight)
    np.testing.assert_allclose(one_metrics["loss"], eight_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(one_eval["correct"], eight_eval["correct"])
    assert float(one_eval["count"]) == 16


def test_step_trains_a_zoo_model_and_updates_batch_stats():
    model = models.get("lenet5", num_classes=10)
    images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    batch = {"image": images, "label": jnp.arange(8) % 10}
    variables = model.init(jax.random.key(0), images[:1], train=False)
    state = create_train_state(model.apply, variables, sd_optimizer(0.05), jax.random.key(4))
    train, evaluate, state = make_steps(sharding.data_mesh(jax.devices()[:2]), state)
    first = float(evaluate(state, batch)["loss_sum"])
    for _ in range(20):
        state, _ = train(state, batch)
    assert float(evaluate(state, batch)["loss_sum"]) < first
    assert int(state.step) == 20


def test_batch_that_does_not_divide_raises():
    with pytest.raises(ValueError, match="multiple of 8"):
        sharding.check_batch(12, sharding.data_mesh())


def test_shard_large_splits_only_big_divisible_kernels():
    mesh = sharding.data_mesh()
    shardings = sharding.shard_large({"big": np.zeros((64, 1024)), "small": np.zeros(10)}, mesh, min_size=1000)
    assert shardings["big"].spec == jax.sharding.PartitionSpec(None, "data")
    assert shardings["small"].spec == jax.sharding.PartitionSpec()


def _conv_fusions(text):
    """The names of the library fusions (YNNPACK etc.) in compiled HLO text whose computation holds a
    convolution."""
    bodies = dict(re.findall(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", text, flags=re.M | re.S))
    fusions = re.findall(r'^\s*(?:ROOT )?%(\S+) = [^\n]*calls=%([^,\s]+)[^\n]*"kind":"__\w+_fusion"', text, flags=re.M)
    return [name for name, called in fusions if " convolution(" in bodies.get(called, "")]


def test_cpu_train_step_leaves_convolutions_to_xla():
    """On CPU the steps compile with CPU_COMPILER_OPTIONS: no convolution of the train step goes to
    YNNPACK (its kernel gradient is the slow one), while compiling with XLA's own defaults ({}) hands
    them over (YNNPACK takes convolutions from 32 features). The evaluation step may leave a
    convolution to YNNPACK: a reduction fusion takes in a convolution whose only consumers lead to it."""
    from sd_jax.train.step import CPU_COMPILER_OPTIONS, default_compiler_options

    train, _, state, batch = _setup(jax.devices()[:1], features=32)
    assert default_compiler_options(sharding.data_mesh(jax.devices()[:1])) == CPU_COMPILER_OPTIONS
    assert _conv_fusions(train.lower(state, batch).compile().as_text()) == []
    xla_defaults, _, state = make_steps(sharding.data_mesh(jax.devices()[:1]), state, compiler_options={})
    assert _conv_fusions(xla_defaults.lower(state, batch).compile().as_text())


def test_cpu_steps_give_batch_norm_statistics_to_ynnpack_with_the_same_numbers():
    """CPU_COMPILER_OPTIONS keep reductions with YNNPACK: no batch-norm statistic becomes XLA's
    strided reduce-window (the dot-only options make them so), and one step gives the same loss
    and variables as under the dot-only options, to float32 rounding."""
    model = _Tiny()
    # A batch over 32, which XLA's tree rewrite splits, and 32768 conv outputs, YNNPACK's minimum.
    images = jax.random.normal(jax.random.key(1), (64, 8, 8, 3))
    batch = {"image": images, "label": jnp.arange(64) % 10}
    variables = model.init(jax.random.key(0), images[:1], train=False)
    mesh = sharding.data_mesh(jax.devices()[:1])
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    dot_only = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    results = []
    for options in (None, dot_only):
        state = create_train_state(model.apply, variables, sd_optimizer(0.1), jax.random.key(2))
        train, _, state = make_steps(mesh, state, compiler_options=options)
        text = train.lower(state, batch).compile().as_text()
        statistics_windows = re.findall(r"reduce-window\([^\n]*window=\{size=\d+x\d+x\d+x\d+ ", text)  # NHWC
        assert bool(statistics_windows) == (options is dot_only)
        results.append(jax.device_get(train(state, batch)))
    (default, default_metrics), (previous, previous_metrics) = results
    np.testing.assert_allclose(default_metrics["loss"], previous_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 default.variables, previous.variables)


def test_cpu_options_are_dropped_where_xla_does_not_know_them(monkeypatch):
    """Another jaxlib may not know the option: the steps then compile with XLA's defaults."""
    from sd_jax.train import step

    monkeypatch.setattr(step, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    step._cpu_options_known.cache_clear()
    try:
        assert step.default_compiler_options(sharding.data_mesh(jax.devices()[:1])) == {}
        train, _, state, batch = _setup(jax.devices()[:1])
        assert np.isfinite(float(train(state, batch)[1]["loss"]))
    finally:
        step._cpu_options_known.cache_clear()


THRESHOLD = 2.0**-5


@functools.cache
def _sd_mlp_state(mode):
    """A tiny SD MLP (C at LeCun scale, threshold 2^-5, as the tuned from-scratch recipe) and its state;
    latent C trains by SGD through the STE, pow2 C by the bucket switch; no weight decay, which alone
    would shrink latent C."""
    rules = SDRules(mode=mode, threshold=THRESHOLD, init_scheme="lecun")
    model = models.get("mlp", num_classes=10, sd=rules, hidden=(32,))
    images = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
    variables = jax.jit(lambda key: model.init(key, images[:1], train=False))(jax.random.key(0))
    coeff_update = "latent" if mode == "latent" else "bucket_switch"
    tx = sd_optimizer(0.05, weight_decay=0.0, coeff_update=coeff_update, threshold=THRESHOLD)
    return create_train_state(model.apply, variables, tx, jax.random.key(4)), {"image": images,
                                                                              "label": jnp.arange(16) % 10}


@functools.cache
def _jitted_step(compressibility_weight):
    return jax.jit(functools.partial(train_step, compressibility_weight=compressibility_weight))


def _cross_entropy_step(state, batch):
    """The trainable variables after one step of the cross-entropy alone (the step before the
    compressibility loss)."""
    dropout_key, quant_key = jax.random.split(jax.random.fold_in(state.key, state.step))

    def loss(trainable):
        logits, _ = state.apply_fn({**trainable, **state.frozen}, batch["image"], train=True,
                                   mutable=["batch_stats", "sd_quant"], rngs={"dropout": dropout_key, "quant": quant_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    changes, _ = state.tx.update(jax.grad(loss)(state.trainable), state.opt_state, state.trainable)
    return optax.apply_updates(state.trainable, changes)


def test_compressibility_weight_zero_gives_the_cross_entropy_step_bit_for_bit():
    state, batch = _sd_mlp_state("latent")
    stepped, metrics = _jitted_step(0.0)(state, batch)
    jax.tree.map(np.testing.assert_array_equal, stepped.trainable, jax.jit(_cross_entropy_step)(state, batch))
    assert float(metrics["compressibility"]) == pytest.approx(
        float(mean_compressibility(coefficient_pairs(state.variables))))


def _zero_fraction(state):
    """The fraction of C inside the mask that the SD layers quantize to zero."""
    pairs = coefficient_pairs(state.variables)
    zeros = sum(int(jnp.sum(mask & (pow2.quantize_pow2(coeff, THRESHOLD, 32.0) == 0))) for coeff, mask in pairs)
    return zeros / sum(int(jnp.sum(mask)) for _, mask in pairs)


@pytest.mark.parametrize("mode", ["latent", "pow2"])
def test_a_large_compressibility_weight_makes_c_more_compressible(mode):
    """Ten steps with weight 5 against weight 0: the ratio falls below where it started and where the
    cross-entropy alone takes it; in latent mode more of C falls under the threshold."""
    start, batch = _sd_mlp_state(mode)
    ends = {}
    for weight in (0.0, 5.0):
        state = start
        for _ in range(10):
            state, metrics = _jitted_step(weight)(state, batch)
            assert np.isfinite(float(metrics["loss"]))
        ends[weight] = state
    ratio = lambda state: float(mean_compressibility(coefficient_pairs(state.variables)))
    assert ratio(ends[5.0]) < min(ratio(start), ratio(ends[0.0])) - 0.02
    if mode == "latent":
        assert _zero_fraction(ends[5.0]) > _zero_fraction(ends[0.0]) + 0.02
