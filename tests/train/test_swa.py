import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax.train import swa


def test_swa_averages_the_parameters_after_each_epoch_from_the_start():
    params = {"w": jnp.array(0.0)}
    transform = swa.swa(first_step=4, every=2)  # after steps 4, 6, 8, ...
    state = transform.init(params)
    for value in range(1, 9):  # step `value` moves w from value - 1 to value
        params_before = {"w": jnp.array(value - 1.0)}
        updates, state = transform.update({"w": jnp.array(1.0)}, state, params_before)
        assert float(updates["w"]) == 1.0  # passes through
    assert int(state.averaged) == 3 and float(state.average["w"]) == pytest.approx((4 + 6 + 8) / 3)
    chained = optax.chain(optax.sgd(0.1), swa.swa(first_step=1))
    assert swa.find_state(chained.init(params)).averaged == 0
    with pytest.raises(ValueError, match="first_step >= 1"):
        swa.swa(first_step=0)


def test_swa_projection_uses_the_smallest_magnitude_of_the_layers():
    from sd_jax.core import pow2
    from sd_jax.nn.rules import SDRules

    threshold = 4e-3
    layer_threshold = SDRules(mode="latent", threshold=threshold).select("fc", None).threshold
    assert layer_threshold == pow2.min_coeff(threshold) < threshold  # 2^-8
    coeff = jnp.array([0.3, 0.7, 0.001, 0.00395, -0.00390625, 0.0019, 100.0])
    mask = jnp.array([True, False, True, True, True, True, True])
    projected = swa.project_coefficients({"c": coeff}, {"c": mask}, threshold=threshold, max_coeff=32.0)
    layer = jnp.where(mask, pow2.quantize_pow2(coeff, layer_threshold, 32.0), 0.0)  # the latent layer's q(C)
    np.testing.assert_array_equal(projected["c"], layer)
    np.testing.assert_array_equal(projected["c"], [0.25, 0.0, 0.0, 2**-8, -(2**-8), 0.0, 32.0])


def test_recompute_batch_stats_is_the_exact_mean_of_batch_statistics():
    model = nn.BatchNorm(use_running_average=False, momentum=0.9)
    batches = [jax.random.normal(jax.random.key(i), (16, 4)) * (i + 1) + i for i in range(3)]
    variables = model.init(jax.random.key(9), batches[0])
    variables = {**variables, "batch_stats": jax.tree.map(lambda x: x + 7.0, variables["batch_stats"])}  # ignored
    apply = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
    stats = swa.recompute_batch_stats(apply, variables, batches, momentum=0.9)
    np.testing.assert_allclose(stats["mean"], np.mean([np.mean(b, 0) for b in batches], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([np.var(b, 0) for b in batches], 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        swa.recompute_batch_stats(apply, variables, [], momentum=0.9)
