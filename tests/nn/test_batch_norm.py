"""Tests for sd_jax/nn/batch_norm.py: StoredBatchNorm is flax.linen.BatchNorm (variables, forward pass,
running statistics) with low-bit stored activations, and a ResNet built with it keeps less for backprop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax import models
from sd_jax.nn.batch_norm import StoredBatchNorm
from sd_jax.nn.layers import low_precision_factories

X = jax.random.normal(jax.random.key(0), (8, 5, 5, 3)) * 2.0 + 0.5
RESIDUAL = jax.random.normal(jax.random.key(1), X.shape)


class _Flax(nn.Module):
    """nn.BatchNorm, then + residual and ReLU: what StoredBatchNorm fuses."""

    @nn.compact
    def __call__(self, x, residual, *, train):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x) + residual
        return nn.relu(y)


class _Stored(nn.Module):
    @nn.compact
    def __call__(self, x, residual, *, train):
        return StoredBatchNorm(4, 0.9, 1e-5, relu=True, name="bn")(x, residual, train=train)


def test_variables_forward_and_running_statistics_are_flax_batch_norms():
    flax_vars = _Flax().init(jax.random.key(0), X, RESIDUAL, train=False)
    stored_vars = _Stored().init(jax.random.key(0), X, RESIDUAL, train=False)
    assert jax.tree.structure(flax_vars) == jax.tree.structure(stored_vars)
    jax.tree.map(np.testing.assert_array_equal, flax_vars, stored_vars)
    variables = {"params": {"bn": {"scale": jnp.linspace(0.5, 2, 3), "bias": jnp.array([0.1, -0.2, 0.3])}},
                 "batch_stats": flax_vars["batch_stats"]}
    y0, new0 = _Flax().apply(variables, X, RESIDUAL, train=True, mutable=["batch_stats"])
    y1, new1 = _Stored().apply(variables, X, RESIDUAL, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new0, new1)
    trained = dict(variables, **new0)
    np.testing.assert_allclose(_Stored().apply(trained, X, RESIDUAL, train=False),
                               _Flax().apply(trained, X, RESIDUAL, train=False), rtol=1e-5, atol=1e-5)


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="stored_activation_bits=3 is not one of"):
        StoredBatchNorm(3).init(jax.random.key(0), X, train=True)


def _step_temp_bytes(model, x, labels, variables):
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.jit(jax.grad(loss)).lower(variables["params"]).compile().memory_analysis().temp_size_in_bytes


def test_a_resnet_with_4_bit_stored_activations_computes_the_same_and_keeps_under_half_for_backprop():
    """ResNet-20, batch 32 of 32×32×3: the same variables and training forward pass as exact, and the
    compiled gradient's temporary memory under half of exact (its conv, batch norm and ReLU inputs all low-bit)."""
    x = jax.random.normal(jax.random.key(2), (32, 32, 32, 3))
    labels = jnp.arange(32) % 10
    exact = models.get("resnet20", num_classes=10)
    stored = models.get("resnet20", num_classes=10, stored_activation_bits=4,
                        **low_precision_factories(stored_activation_bits=4))
    variables = exact.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(stored.init(jax.random.key(0), x, train=False))
    run = lambda model: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(run(stored), run(exact), rtol=1e-4, atol=1e-4)
    ratio = _step_temp_bytes(stored, x, labels, variables) / _step_temp_bytes(exact, x, labels, variables)
    assert ratio < 0.5
