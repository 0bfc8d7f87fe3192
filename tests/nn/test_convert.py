"""Tests for sd_jax/nn/convert.py: dense <-> SD conversion of variables."""
import functools

import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax import models
from sd_jax.core.network import decompose_network
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SD_COLLECTIONS, SDConv, SDDense, SDRules, dense_variables, sd_tree, sd_variables, to_sd


def _small_params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32)
    return {
        "stem/conv": {"kernel": normal(7, 7, 3, 4)},  # left dense by decompose_network's default
        "block/conv": {"kernel": normal(3, 3, 4, 6)},
        "block/bn": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
        "head/dense": {"kernel": normal(6, 5), "bias": jnp.zeros(5)},
    }


def test_decomposed_kernels_move_to_the_sd_collections():
    params = _small_params()
    result = decompose_network(params, threshold=1e-3)
    variables = sd_variables(result.tree)
    assert set(variables) == {"params", *SD_COLLECTIONS}
    assert set(variables["sd_coeff"]) == {"block/conv", "head/dense"}
    assert set(variables["params"]) == {"stem/conv", "block/bn", "head/dense"}
    assert set(variables["params"]["head/dense"]) == {"bias"}
    np.testing.assert_array_equal(variables["params"]["stem/conv"]["kernel"], params["stem/conv"]["kernel"])
    decomposition = result.tree["block/conv"]["kernel"]
    np.testing.assert_array_equal(variables["sd_basis"]["block/conv"]["basis"], decomposition.basis)
    np.testing.assert_array_equal(variables["sd_coeff"]["block/conv"]["coeff"], decomposition.coeff)
    np.testing.assert_array_equal(variables["sd_mask"]["block/conv"]["mask"], decomposition.mask)


def test_row_scaled_decomposition_raises_value_error():
    result = decompose_network(_small_params(), threshold=1e-3, row_scale=True)
    with pytest.raises(ValueError, match="row_scale=True, but SD layers store no row scale"):
        sd_variables(result.tree)


@pytest.mark.slow
def test_sd_resnet20_from_a_decomposition_computes_the_reconstructed_dense_network():
    # What you train is what you serve: the SD network on converted variables gives the logits of
    # the dense network whose kernels are the decomposition's C·B.
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    dense_model = models.get("resnet20", num_classes=10)
    dense = jax.jit(lambda key, x: dense_model.init(key, x, train=False))(jax.random.key(0), x)
    result = decompose_network(dense["params"], threshold=1e-3)
    sd_model = models.get("resnet20", num_classes=10, conv=functools.partial(SDConv, mode="pow2"),
                          dense=functools.partial(SDDense, mode="pow2"))
    variables = {**sd_variables(result.tree), "batch_stats": dense["batch_stats"]}
    sd_logits = jax.jit(lambda v, x: sd_model.apply(v, x, train=False))(variables, x)
    reconstructed = {**dense, "params": result.reconstruct()}
    dense_logits = jax.jit(lambda v, x: dense_model.apply(v, x, train=False))(reconstructed, x)
    np.testing.assert_allclose(sd_logits, dense_logits, rtol=1e-4, atol=1e-4)


# A small zoo model: two SD dense layers with different block shapes, so conversions compile little.
MLP_INPUT = (3, 4, 4, 1)


def _mlp(hidden=(12,), sd=False):
    return models.get("mlp", num_classes=5, hidden=hidden, sd=sd)


@pytest.fixture(scope="module")
def mlp_dense():
    """Seeded dense MLP variables and the input."""
    x = jax.random.normal(jax.random.key(1), MLP_INPUT)
    return synthetic_variables(_mlp(), x), x


@pytest.mark.parametrize("mode", ["pow2", "latent"])
def test_to_sd_round_trip_keeps_masks_exponents_and_logits(mlp_dense, mode):
    dense, x = mlp_dense
    rules = SDRules(threshold=4e-3, mode=mode)
    variables, decomposition = to_sd(dense, rules)
    model = _mlp(sd=rules)
    # SD variables -> Decomposition tree -> SD variables: the coefficients the layers use are the
    # decomposition's (latent layers quantize with min_coeff(4e-3) = 2^-8, which keeps them all).
    back = sd_variables(sd_tree(model, variables, x, train=False))
    for collection in SD_COLLECTIONS:
        jax.tree.map(np.testing.assert_array_equal, back[collection], variables[collection])
    for layer in ("hidden1", "head"):
        kernel = decomposition.tree[layer]["dense"]["kernel"]
        coeff = np.asarray(kernel.coeff)
        assert np.asarray(kernel.mask).sum() == (coeff != 0).sum() > 0
        assert 2.0**-8 <= np.abs(coeff[coeff != 0]).min()
    # SD -> dense: the kernels are the decomposition's C·B, and the logits agree.
    rebuilt = dense_variables(model, variables, x, train=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 rebuilt["params"], decomposition.reconstruct())
    logits = jax.jit(lambda v, d: (model.apply(v, x, train=False), _mlp().apply(d, x, train=False)))
    np.testing.assert_allclose(*logits(variables, rebuilt), rtol=1e-5, atol=1e-5)


def test_to_sd_follows_rules_and_passes_other_collections_through(mlp_dense):
    dense, _ = mlp_dense
    dense = {**dense, "batch_stats": {"bn": {"mean": jnp.arange(3.0)}}}
    variables, decomposition = to_sd(dense, SDRules([("^head/dense$", {"skip": True}),
                                                     ("hidden", {"prune_fraction": 0.5})]))
    assert traverse_util.flatten_dict(variables["sd_coeff"], sep="/").keys() == {"hidden1/dense/coeff"}
    np.testing.assert_array_equal(variables["params"]["head"]["dense"]["kernel"],
                                  dense["params"]["head"]["dense"]["kernel"])
    assert variables["batch_stats"] is dense["batch_stats"]
    (report,) = decomposition.reports
    assert report.density <= 0.5  # half the rows pruned before the decomposition


def test_gradients_reach_basis_and_coefficients_and_never_cross_the_mask(mlp_dense):
    dense, x = mlp_dense
    model = _mlp(sd=SDRules(threshold=0.05))
    variables, _ = to_sd(dense, SDRules(threshold=0.05))
    trainable = {c: variables[c] for c in ("params", "sd_basis", "sd_coeff")}
    optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def steps(trainable):
        def loss(t):
            return jnp.sum(model.apply({**t, "sd_mask": variables["sd_mask"]}, x, train=True) ** 2)
        grads = jax.grad(loss)(trainable)
        state = optimizer.init(trainable)
        for _ in range(3):
            updates, state = optimizer.update(jax.grad(loss)(trainable), state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        return grads, trainable

    grads, trained = steps(trainable)
    masks = traverse_util.flatten_dict(variables["sd_mask"])
    assert len(masks) == 2
    for (*layer, _), mask in masks.items():
        mask = np.asarray(mask)
        at = lambda tree: functools.reduce(lambda node, key: node[key], layer, tree)
        assert np.abs(np.asarray(at(grads["sd_basis"])["basis"])).sum() > 0
        coeff_grad = np.asarray(at(grads["sd_coeff"])["coeff"])
        assert np.abs(coeff_grad[mask]).sum() > 0 and (coeff_grad[~mask] == 0).all()
        # Entries outside the mask stay 0 through SGD with momentum and weight decay.
        assert (np.asarray(at(trained["sd_coeff"])["coeff"])[~mask] == 0).all()


def test_sd_variables_of_another_shape_raise_value_error_naming_the_layer(mlp_dense):
    dense, x = mlp_dense
    variables, _ = to_sd(dense)
    with pytest.raises(ValueError, match="layer 'hidden1/dense': coeff has shape"):
        jax.eval_shape(lambda v: _mlp(hidden=(30,), sd=True).apply(v, x, train=False), variables)


def test_sd_variables_missing_for_an_sd_layer_raise_value_error_naming_the_layer(mlp_dense):
    dense, x = mlp_dense
    variables, _ = to_sd(dense, SDRules([("^head/dense$", {"skip": True})]))
    with pytest.raises(ValueError, match="layer 'head/dense': the variables have no sd_coeff/head/dense/coeff"):
        sd_tree(_mlp(sd=True), variables, x, train=False)


def test_to_sd_rule_matching_no_layer_raises_value_error(mlp_dense):
    with pytest.raises(ValueError, match=r"\['stage1'\] match no layer"):
        to_sd(mlp_dense[0], SDRules([("stage1", {})]))
