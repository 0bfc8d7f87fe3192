import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.io import CheckpointError
from sd_jax.train.optimizer import sd_optimizer
from sd_jax.train.step import create_train_state, train_step
from sd_jax.train.train_checkpoint import TrainCheckpoints


class _Net(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(3, name="head")(nn.relu(x))


def _state(width=8, seed=0):
    model = _Net(width)
    x = jnp.ones((4, 5))
    return create_train_state(model.apply, model.init(jax.random.key(seed), x, train=False), sd_optimizer(0.1),
                              jax.random.key(7))


def _batch(i):
    return {"image": jax.random.normal(jax.random.key(i), (4, 5)), "label": jnp.arange(4) % 3}


def test_resume_is_bitwise_identical(tmp_path):
    step = jax.jit(train_step)
    uninterrupted = _state()
    for i in range(6):
        uninterrupted, _ = step(uninterrupted, _batch(i))

    checkpoints = TrainCheckpoints(str(tmp_path), every_steps=3)
    state = _state()
    for i in range(3):
        state, metrics = step(state, _batch(i))
    checkpoints.save(3, state, data_state={"position": 3}, metrics={"accuracy": metrics["accuracy"]})
    checkpoints.close()

    resumed, data_state = TrainCheckpoints(str(tmp_path), every_steps=3).restore(_state(seed=1))
    assert data_state == {"position": 3} and int(resumed.step) == 3
    for i in range(data_state["position"], 6):
        resumed, _ = step(resumed, _batch(i))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(uninterrupted.variables),
                 jax.device_get(resumed.variables))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(uninterrupted.opt_state),
                 jax.device_get(resumed.opt_state))
    np.testing.assert_array_equal(jax.random.key_data(uninterrupted.key), jax.random.key_data(resumed.key))


def test_keeps_the_last_and_the_best_across_a_restart(tmp_path):
    checkpoints = TrainCheckpoints(str(tmp_path), every_steps=1, keep_last=2, keep_best=1)
    state = _state()
    for step, accuracy in zip(range(1, 4), [0.2, 0.9, 0.3]):
        checkpoints.save(step, state, metrics={"accuracy": accuracy}, evaluation={"best_step": 2})
    checkpoints.close()
    checkpoints = TrainCheckpoints(str(tmp_path), every_steps=1, keep_last=2, keep_best=1)  # metrics read back
    assert checkpoints.metrics(2) == {"accuracy": 0.9} and checkpoints.evaluation(3) == {"best_step": 2}
    for step, accuracy in zip(range(4, 6), [0.4, 0.5]):
        checkpoints.save(step, state, metrics={"accuracy": accuracy})
    checkpoints.save(6, state, force=True)  # not evaluated: kept only while among the newest
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 5, 6]
    assert checkpoints.metrics(6) is None and checkpoints.evaluation(6) == {}
    checkpoints.close()


def test_no_checkpoint_and_wrong_model(tmp_path):
    checkpoints = TrainCheckpoints(str(tmp_path), every_steps=1)
    assert checkpoints.restore(_state()) is None
    checkpoints.save(1, _state(), force=True)
    checkpoints.wait()
    with pytest.raises(CheckpointError, match="different model"):
        checkpoints.restore(_state(width=16))
    checkpoints.close()
