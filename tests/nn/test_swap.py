"""Tests for sd_jax/nn/swap.py: SD layers in a model that knows nothing of sd_jax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.nn import SD_COLLECTIONS, SDRules, dense_variables, swap_layers, to_sd


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.features, (3, 3), strides=(2, 2), padding="SAME")(x))
        return nn.Conv(self.features, (3, 3), feature_group_count=self.features, use_bias=False)(x)


class UserNet(nn.Module):
    """A plain Flax model: nn.Conv / nn.Dense called directly, nested modules, a 1-D conv, no sd_jax."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        x = Block(8, name="block")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Conv(4, (3,), padding="SAME")(x[:, :, None])  # 1-D conv over the channel axis
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
RULES = SDRules([("^stem$", {"skip": True}), ("^Dense_0$", {"mode": "pow2"})], threshold=0.05)


@pytest.fixture(scope="module")
def swapped():
    """The swapped model and its initial variables (init compiled once: eager init compiles every op)."""
    model = swap_layers(UserNet(), RULES)
    return model, jax.jit(model.init)(jax.random.key(0), X)


def test_swapped_layers_hold_sd_variables_at_the_dense_model_paths(swapped):
    _, variables = swapped
    assert set(variables) == {"params", *SD_COLLECTIONS}
    assert set(variables["sd_coeff"]) == {"block", "Dense_0"}
    assert set(variables["sd_coeff"]["block"]) == {"Conv_0", "Conv_1"}
    assert set(variables["params"]["block"]["Conv_0"]) == {"bias"}  # the kernel is SD now
    assert "Conv_1" not in variables["params"]["block"]  # no bias, no dense kernel
    assert set(variables["params"]["stem"]) == {"kernel", "bias"}  # skipped by its rule
    assert set(variables["params"]["Conv_0"]) == {"kernel", "bias"}  # 1-D: left dense by default
    coeff = np.asarray(variables["sd_coeff"]["Dense_0"]["coeff"])
    assert (coeff[coeff != 0] == 2.0 ** np.round(np.log2(np.abs(coeff[coeff != 0]))) * np.sign(coeff[coeff != 0])).all()


def _both_logits(model, variables, dense):
    return jax.jit(lambda v, d: (model.apply(v, X), UserNet().apply(d, X)))(variables, dense)


def test_swapped_model_equals_the_user_model_with_rebuilt_kernels(swapped):
    model, variables = swapped
    sd_logits, dense_logits = _both_logits(model, variables, dense_variables(model, variables, X))
    np.testing.assert_allclose(sd_logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_user_model_variables_convert_to_sd_and_back(swapped):
    model, initial = swapped
    dense = dense_variables(model, initial, X)  # any dense variables of UserNet will do
    variables, decomposition = to_sd(dense, RULES)
    assert {r.name for r in decomposition.reports} == {"block/Conv_0/kernel", "block/Conv_1/kernel", "Dense_0/kernel"}
    rebuilt = dense_variables(model, variables, X)
    np.testing.assert_array_equal(rebuilt["params"]["stem"]["kernel"], dense["params"]["stem"]["kernel"])
    sd_logits, dense_logits = _both_logits(model, variables, rebuilt)
    np.testing.assert_allclose(sd_logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_rule_matching_no_layer_raises_value_error():
    with pytest.raises(ValueError, match=r"\['Dense_7'\] match no layer"):
        jax.eval_shape(swap_layers(UserNet(), SDRules([("Dense_7", {})])).init, jax.random.key(0), X)


def test_rule_selecting_a_1d_conv_raises_value_error_naming_the_layer():
    with pytest.raises(ValueError, match="layer 'Conv_0': a 1-D convolution"):
        jax.eval_shape(swap_layers(UserNet(), SDRules([("^Conv_0$", {})])).init, jax.random.key(0), X)


def test_swap_layers_rejects_what_is_not_a_module():
    with pytest.raises(ValueError, match="is not a flax.linen Module"):
        swap_layers(lambda x: x, RULES)
