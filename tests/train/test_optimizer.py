import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax.train.optimizer import sd_optimizer


def _variables():
    key = jax.random.key(0)
    return {"params": {"bias": jnp.zeros(3)}, "sd_basis": {"basis": jax.random.normal(key, (4, 3, 3))},
            "sd_coeff": {"coeff": jnp.array([[0.5, 0.0, -1.0]] * 4)}}


def test_each_collection_gets_its_rule():
    variables = _variables()
    optimizer = sd_optimizer(0.1, momentum=0.0, weight_decay=0.0)
    state = optimizer.init(variables)
    grads = jax.tree.map(jnp.ones_like, variables)
    updates, _ = optimizer.update(grads, state, variables)
    new = optax.apply_updates(variables, updates)
    np.testing.assert_allclose(new["params"]["bias"], -0.1)  # plain SGD
    np.testing.assert_array_equal(new["sd_coeff"]["coeff"][0], [0.25, 0.0, -2.0])  # bucket switch
    latent = sd_optimizer(0.1, momentum=0.0, weight_decay=0.0, coeff_update="latent")
    updates, _ = latent.update(grads, latent.init(variables), variables)
    np.testing.assert_allclose(optax.apply_updates(variables, updates)["sd_coeff"]["coeff"][0], [0.4, -0.1, -1.1])


def test_mask_collection_is_refused():
    variables = dict(_variables(), sd_mask={"mask": jnp.ones(3, bool)})
    with pytest.raises(ValueError, match="not trainable"):
        sd_optimizer(0.1).init(variables)
    with pytest.raises(ValueError, match="coeff_update"):
        sd_optimizer(0.1, coeff_update="adam")


def test_quantize_each_step_snaps_c_to_powers_of_two_after_the_sgd_step():
    variables = _variables()
    optimizer = sd_optimizer(0.1, momentum=0.9, weight_decay=0.0, coeff_update="quantize_each_step", threshold=4e-3)
    state = optimizer.init(variables)
    grads = jax.tree.map(lambda x: jnp.full_like(x, -1.3), variables)
    updates, state = optimizer.update(grads, state, variables)
    coeff = optax.apply_updates(variables, updates)["sd_coeff"]["coeff"][0]
    # 0.5 + 0.13 -> 0.5; 0 + 0.13 -> 0.125; -1 + 0.13 -> -1: SGD first, then the nearest power of two.
    np.testing.assert_array_equal(coeff, [0.5, 0.125, -1.0])
    # The momentum keeps the float step, so repeated small steps still move C eventually.
    for _ in range(3):
        variables = optax.apply_updates(variables, updates)
        updates, state = optimizer.update(grads, state, variables)
    assert float(optax.apply_updates(variables, updates)["sd_coeff"]["coeff"][0, 0]) > 0.5
