import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax.train import schedules, swa
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


def test_reference_schedule_shape():
    schedule = schedules.reference_schedule(0.1, 1000)
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(499)) == pytest.approx(0.1)
    assert float(schedule(700)) == pytest.approx(0.1 + (0.001 - 0.1) * 0.5)
    assert float(schedule(900)) == pytest.approx(0.001, rel=1e-5) and float(schedule(999)) == pytest.approx(0.001, rel=1e-5)
    assert float(schedules.reference_schedule(0.1, 100, swa_lr=0.05)(95)) == pytest.approx(0.05)
    cosine = schedules.cosine_schedule(0.1, 100, warmup_steps=10)
    assert float(cosine(10)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        schedules.reference_schedule(0.1, 0)


def test_swa_averages_from_the_start_step_and_projects_back():
    params = {"w": jnp.array(0.0)}
    transform = swa.swa(start_step=2)
    state = transform.init(params)
    for value in [10.0, 20.0, 1.0, 2.0, 3.0]:
        _, state = transform.update({"w": jnp.array(0.0)}, state, {"w": jnp.array(value)})
    assert float(state.average["w"]) == pytest.approx(2.0) and int(state.averaged) == 3
    projected = swa.project_coefficients({"c": jnp.array([0.3, 0.7, 0.001])}, {"c": jnp.array([True, False, True])},
                                         threshold=4e-3, max_coeff=32.0)
    np.testing.assert_array_equal(projected["c"], [0.25, 0.0, 0.0])


def test_recompute_batch_stats_is_the_exact_mean_of_batch_statistics():
    model = nn.BatchNorm(use_running_average=False, momentum=0.9)
    batches = [jax.random.normal(jax.random.key(i), (16, 4)) + i for i in range(3)]
    variables = model.init(jax.random.key(9), batches[0])
    apply = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
    stats = swa.recompute_batch_stats(apply, variables, batches)
    expected = np.mean([np.asarray(b).mean(0) for b in batches], axis=0)
    np.testing.assert_allclose(stats["mean"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        swa.recompute_batch_stats(apply, variables, [])
