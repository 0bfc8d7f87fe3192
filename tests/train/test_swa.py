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
    projected = swa.project_coefficients({"c": coeff}, {"c": mask}, smallest=layer_threshold, max_coeff=32.0)
    layer = jnp.where(mask, pow2.quantize_pow2(coeff, layer_threshold, 32.0), 0.0)  # the latent layer's q(C)
    np.testing.assert_array_equal(projected["c"], layer)
    np.testing.assert_array_equal(projected["c"], [0.25, 0.0, 0.0, 2**-8, -(2**-8), 0.0, 32.0])


def test_swa_projection_refuses_a_raw_threshold():
    with pytest.raises(ValueError, match="not 0 or a power of two"):
        swa.project_coefficients({"c": jnp.ones(2)}, {"c": jnp.ones(2, bool)}, smallest=4e-3, max_coeff=32.0)


@pytest.mark.parametrize("revive_at", ["nearest", "ceil"])
def test_trainer_swa_model_projects_with_the_bucket_switch_smallest_magnitude(revive_at):
    """The SWA average keeps exactly the magnitudes the run's bucket switch keeps: with the reference's
    revive_at='ceil' (smallest 2^-7 for threshold 4e-3), an average of 1.2 * 2^-8 is 0, not 2^-8."""
    from sd_jax.core import pow2
    from sd_jax.nn.rules import SDRules
    from sd_jax.train import optimizer, trainer
    from sd_jax.train.step import create_train_state
    from tests.train.tiny_config import tiny_config

    config = tiny_config(sd__threshold=4e-3, optim__revive_at=revive_at, swa__start_epoch=1)
    smallest = trainer._smallest_magnitude(config, config.sd.threshold)
    assert smallest == (pow2.ceil_pow2(4e-3) if revive_at == "ceil" else pow2.min_coeff(4e-3))
    average = jnp.array([1.2 * 2**-8, 2**-7, 0.3, -(2**-8)])
    variables = {"params": {}, "sd_coeff": {"fc": {"coeff": average}}, "sd_mask": {"fc": {"mask": jnp.ones(4, bool)}}}
    tx = optax.chain(optimizer.sd_optimizer(0.1, threshold=4e-3, smallest=smallest), swa.swa(first_step=1))
    state = create_train_state(lambda *a, **k: None, variables, tx, jax.random.key(0))
    state = state.replace(opt_state=jax.tree.map(
        lambda node: node._replace(average=state.trainable) if isinstance(node, swa.SWAState) else node,
        state.opt_state, is_leaf=lambda node: isinstance(node, swa.SWAState)))
    projected = trainer._swa_model(config, SDRules.from_config(config), state, None, [])
    kept = np.asarray(projected.trainable["sd_coeff"]["fc"]["coeff"])
    expected = [2**-8, 2**-7, 0.25, -(2**-8)] if revive_at == "nearest" else [0.0, 2**-7, 0.25, 0.0]
    np.testing.assert_array_equal(kept, expected)


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
