import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax.core import pow2
from sd_jax.train.bucket_switch import bucket_switch


def _coefficients(seed=0, shape=(40, 9, 3)):
    return {"layer": {"coeff": pow2.quantize_pow2(jax.random.normal(jax.random.key(seed), shape) * 0.05, 4e-3, 32.0)}}


def _powers_or_zero(values):
    mantissa, _ = np.frexp(values.astype(np.float64))
    return (values == 0) | (np.abs(mantissa) == 0.5)


def test_hundred_steps_keep_powers_of_two_inside_the_mask():
    params = _coefficients()
    mask = np.asarray(params["layer"]["coeff"]) != 0
    optimizer = bucket_switch(optax.constant_schedule(0.1), threshold=4e-3, max_coeff=2.0)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for i in range(100):
        grads = jax.tree.map(lambda c: jax.random.normal(jax.random.key(100 + i), c.shape), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        values = np.asarray(params["layer"]["coeff"])
        assert _powers_or_zero(values).all()
        assert (values[~mask] == 0).all()
        nonzero = np.abs(values[values != 0])
        assert nonzero.max() <= 2.0 and nonzero.min() >= pow2.min_coeff(4e-3)


def test_one_switch_moves_one_exponent_step():
    params = {"c": jnp.array([0.5, 0.5, 0.0, -0.25, 2.0**-8, 2.0])}
    mask = {"c": jnp.array([True, True, True, True, True, True])}
    optimizer = bucket_switch(1.0, momentum=0.0, weight_decay=0.0, threshold=4e-3, max_coeff=2.0, mask=mask)
    state = optimizer.init(params)
    # Update = -grad: pushes entry 0 up (away), entry 1 down (toward 0), revives entry 2 negative,
    # entry 3 (negative) away from zero, entry 4 below the smallest magnitude, entry 5 past max_coeff.
    grads = {"c": jnp.array([-1.0, 1.0, 1.0, 1.0, 1.0, -1.0])}
    updates, state = optimizer.update(grads, state, params)
    new = optax.apply_updates(params, updates)["c"]
    np.testing.assert_array_equal(new, [1.0, 0.25, -(2.0**-8), -0.5, 0.0, 2.0])
    np.testing.assert_array_equal(state.counters["c"], 0)


def test_switch_bar_counts_votes_and_update_threshold_ignores_small_steps():
    params = {"c": jnp.array([1.0, 1.0])}
    optimizer = bucket_switch(1.0, momentum=0.0, weight_decay=0.0, switch_bar=2, update_threshold=0.5)
    state = optimizer.init(params)
    grads = {"c": jnp.array([-1.0, -0.1])}
    updates, state = optimizer.update(grads, state, params)
    assert float(jnp.abs(updates["c"]).sum()) == 0  # one vote is not enough
    np.testing.assert_array_equal(state.counters["c"], [1, 0])
    updates, state = optimizer.update(grads, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["c"], [2.0, 1.0])


def test_momentum_and_weight_decay_drive_the_votes():
    params = {"c": jnp.array([1.0])}
    optimizer = bucket_switch(1.0, momentum=0.9, weight_decay=1.0, switch_bar=1)
    state = optimizer.init(params)
    # grad 0 but weight decay pulls toward zero: the entry halves.
    updates, state = optimizer.update({"c": jnp.array([0.0])}, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["c"], [0.5])


@pytest.mark.parametrize("kwargs, message", [(dict(switch_bar=0), "switch_bar"), (dict(max_coeff=30.0), "power of two"),
                                             (dict(threshold=0.0), "threshold")])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bucket_switch(0.1, **kwargs)


def test_update_without_params_raises():
    optimizer = bucket_switch(0.1)
    params = {"c": jnp.ones(3)}
    with pytest.raises(ValueError, match="params"):
        optimizer.update(params, optimizer.init(params))


def test_counters_restart_every_reset_every_steps():
    # The reference resets every counter at the start of each epoch: votes 1, 1 | 1 with switch_bar 3
    # never fire when an epoch is 2 steps long, and fire on the third step without the reset.
    params = {"c": jnp.array([0.5])}
    grads = {"c": jnp.array([-1.0])}  # the update pushes the entry up, away from zero
    for reset_every, expected in ((2, 0.5), (0, 1.0)):
        optimizer = bucket_switch(1.0, momentum=0.0, weight_decay=0.0, switch_bar=3, threshold=4e-3,
                                  reset_every=reset_every)
        state, values = optimizer.init(params), params
        for _ in range(3):
            updates, state = optimizer.update(grads, state, values)
            values = optax.apply_updates(values, updates)
        assert float(values["c"][0]) == expected


def test_revived_entries_start_at_the_given_smallest_magnitude():
    params = {"c": jnp.array([0.0])}
    mask = {"c": jnp.array([True])}
    optimizer = bucket_switch(1.0, momentum=0.0, weight_decay=0.0, threshold=4e-3, mask=mask,
                              smallest=pow2.ceil_pow2(4e-3))
    updates, _ = optimizer.update({"c": jnp.array([-1.0])}, optimizer.init(params), params)
    assert float(optax.apply_updates(params, updates)["c"][0]) == 2.0**-7


def test_each_layer_revives_and_drops_at_its_own_smallest_magnitude():
    """Layers decomposed with thresholds of their own (a storage target's allocation) keep their own
    smallest |C|: revived entries start there and halved ones below it vanish."""
    params = {"a": {"coeff": jnp.array([0.0, 0.25])}, "b": {"coeff": jnp.array([0.0, 0.25])}}
    mask = jax.tree.map(lambda c: jnp.ones(c.shape, bool), params)
    smallest = {"a/coeff": 0.25, "b/coeff": 2.0**-5}
    optimizer = bucket_switch(1.0, momentum=0.0, weight_decay=0.0, mask=mask, smallest=smallest.__getitem__)
    grads = jax.tree.map(lambda _: jnp.array([-1.0, 1.0]), params)  # revive the zero, halve the 0.25
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    moved = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(moved["a"]["coeff"], [0.25, 0.0])
    np.testing.assert_array_equal(moved["b"]["coeff"], [2.0**-5, 0.125])


def test_a_layer_smallest_that_is_not_a_power_of_two_is_named():
    params = {"a": {"coeff": jnp.array([0.5])}}
    optimizer = bucket_switch(0.1, smallest=lambda path: 0.3)
    with pytest.raises(ValueError, match=r"smallest=0.3 \(of a/coeff\) is not a power of two"):
        optimizer.update(params, optimizer.init(params), params)


@pytest.mark.parametrize("kwargs, message", [({"reset_every": -1}, "reset_every"), ({"smallest": 0.003}, "smallest")])
def test_bad_reset_or_smallest_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bucket_switch(0.1, threshold=4e-3, **kwargs)
