"""`swap_layers` and `to_sd` agree on what is SD (issue 13, item 6): a layer the swap cannot run as SD
(nn.ConvTranspose, nn.DenseGeneral, a hand-written kernel, a 1-D or 3-D nn.Conv) raises ValueError
naming it when a rule, or the defaults by its kernel's shape, select it; skipped, it stays dense in
the swapped model and in the variables `to_sd` converts with the same rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.nn import SDRules, dense_variables, swap_layers, to_sd

X = jnp.ones((1, 4, 4, 3))
SKIP = SDRules([("^up$", {"skip": True}), ("^head$", {"skip": True})])


class Net(nn.Module):
    """A 2-D conv (SD), a transposed conv and a DenseGeneral (no SD form)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.ConvTranspose(4, (3, 3), name="up")(x)
        return nn.DenseGeneral(5, name="head")(x.reshape(x.shape[0], -1))


class HandWritten(nn.Module):
    """A layer with its own 'kernel' parameter, which `to_sd` would decompose by its shape."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))
        return x @ kernel


class Conv(nn.Module):
    """A conv of `kernel_size`, then a dense layer (`to_sd` needs one kernel to decompose)."""

    kernel_size: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(2, self.kernel_size, name="conv")(x)
        return nn.Dense(2, name="dense")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("rules, layer, kind", [
    (SDRules(), "up", "ConvTranspose"),
    (SDRules([("^up$", {"skip": True})]), "head", "DenseGeneral"),
    (SDRules([("^up$", {"skip": True}), ("^head$", {"threshold": 0.01})]), "head", "DenseGeneral"),
])
def test_a_selected_layer_the_swap_cannot_run_raises(rules, layer, kind):
    """They were left dense without a word, while `to_sd` decomposed their kernels."""
    with pytest.raises(ValueError, match=rf"layer '{layer}': the rules select this {kind} .*"
                                         rf"\('\^{layer}\$', {{'skip': True}}\)"):
        swap_layers(Net(), rules).init(jax.random.key(0), X)


def test_a_hand_written_kernel_the_defaults_select_raises():
    with pytest.raises(ValueError, match="layer '': the rules select this HandWritten"):
        swap_layers(HandWritten()).init(jax.random.key(0), jnp.ones((1, 3)))


@pytest.mark.slow  # three to_sd decompositions: about 45 s on 2 busy cores
@pytest.mark.parametrize("kernel_size, shape", [((3,), (1, 6, 3)), ((3, 3, 3), (1, 4, 4, 4, 3)),
                                                 ((3, 3), (1, 4, 4, 3))])
def test_a_conv_is_sd_in_the_swap_exactly_where_to_sd_decomposes_it(kernel_size, shape):
    """1-D and 3-D convolutions stay dense by default in both; a rule selecting them raises in both."""
    x = jnp.ones(shape)
    swapped = swap_layers(Conv(kernel_size)).init(jax.random.key(0), x)
    converted, _ = to_sd(Conv(kernel_size).init(jax.random.key(0), x))
    sd = len(kernel_size) == 2
    assert ("kernel" in swapped["params"]["conv"]) is not sd
    assert ("kernel" in converted["params"]["conv"]) is not sd
    assert jax.tree.map(jnp.shape, converted) == jax.tree.map(jnp.shape, swapped)
    if not sd:
        selects = SDRules([("^conv$", {"threshold": 0.01})])
        message = f"layer 'conv': a {len(kernel_size)}-D convolution"
        with pytest.raises(ValueError, match=message):
            swap_layers(Conv(kernel_size), selects).init(jax.random.key(0), x)
        with pytest.raises(ValueError, match=message):
            to_sd(Conv(kernel_size).init(jax.random.key(0), x), selects)


def test_variables_to_sd_decomposed_for_a_layer_the_swap_cannot_run_are_refused_by_name():
    """`to_sd` decomposed the ConvTranspose kernel, and apply failed inside Flax."""
    converted, _ = to_sd(Net().init(jax.random.key(0), X))
    with pytest.raises(ValueError, match=r"layer 'up': the variables hold C for this ConvTranspose .*skip"):
        swap_layers(Net()).apply(converted, X)


@pytest.mark.slow  # a to_sd decomposition: about 15 s on 2 busy cores
def test_skipped_layers_stay_dense_in_the_swap_and_in_to_sd():
    """A skip rule for them matched no layer: the swap never saw them."""
    model = swap_layers(Net(), SKIP)
    initial = model.init(jax.random.key(0), X)
    converted, _ = to_sd(Net().init(jax.random.key(0), X), SKIP)
    assert jax.tree.map(jnp.shape, converted) == jax.tree.map(jnp.shape, initial)
    assert set(converted["sd_coeff"]) == {"conv"}
    dense = dense_variables(model, converted, X)
    np.testing.assert_allclose(model.apply(converted, X), Net().apply(dense, X), rtol=1e-5, atol=1e-5)
