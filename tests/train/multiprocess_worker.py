"""One process of the multi-process tests.

    python tests/train/multiprocess_worker.py step OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]
    python tests/train/multiprocess_worker.py trainer WORKDIR [COORDINATOR NUM_PROCESSES PROCESS_ID]
    python tests/train/multiprocess_worker.py device_data OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Each process simulates 2 CPU devices (4 when it runs alone). `step`: train a few steps on a global
"data" mesh, each process feeding its slice of the global batch, and save the variables. `trainer`:
the whole trainer (tiny SD config, mock MNIST): process-sharded input, Orbax checkpoints, metrics.
`device_data`: the first global batches of mock CIFAR-10 held on the devices (`placement="device"`).
"""

import os
import sys

KIND, OUT = sys.argv[1], sys.argv[2]
NUM_PROCESSES = int(sys.argv[4]) if len(sys.argv) > 4 else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // NUM_PROCESSES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from sd_jax.train import distributed  # noqa: E402

if NUM_PROCESSES > 1:
    distributed.initialize(sys.argv[3], NUM_PROCESSES, int(sys.argv[5]))

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sd_jax.train import sharding  # noqa: E402
from sd_jax.io import atomic_savez, flatten  # noqa: E402
from sd_jax.train.optimizer import sd_optimizer  # noqa: E402
from sd_jax.train.step import create_train_state, make_steps  # noqa: E402


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(10, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def train_steps() -> None:
    """A few steps of Tiny on one fixed global batch; process 0 saves the variables to OUT."""
    model = Tiny()
    images = np.asarray(jax.random.normal(jax.random.key(1), (16, 8, 8, 3)))
    labels = np.arange(16) % 10
    variables = model.init(jax.random.key(0), images[:1], train=False)
    state = create_train_state(model.apply, variables, sd_optimizer(0.1), jax.random.key(2))
    mesh = sharding.data_mesh()
    train, _, state = make_steps(mesh, state)
    rows = slice(jax.process_index() * 16 // NUM_PROCESSES, (jax.process_index() + 1) * 16 // NUM_PROCESSES)
    target = sharding.batch_sharding(mesh)
    batch = {"image": jax.make_array_from_process_local_data(target, images[rows]),
             "label": jax.make_array_from_process_local_data(target, labels[rows])}
    for _ in range(3):
        state, metrics = train(state, batch)
    result = jax.tree.map(lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
                          if not x.is_fully_addressable else np.asarray(x), state.variables)
    if jax.process_index() == 0:
        atomic_savez(OUT, dict(flatten(result), devices=np.array(len(jax.devices()))))


def train_with_trainer() -> None:
    """The tiny SD trainer run of tests/train/tiny_config.py into the workdir OUT (latent C: the bucket
    switch at the reference switch_bar=1 blows the tiny MLP up within 4 steps, too loud to compare)."""
    import tensorflow_datasets as tfds

    from sd_jax.train import trainer
    from tests.train.tiny_config import tiny_config

    with tfds.testing.mock_data(num_examples=64):
        config = tiny_config(model__sd=True, optim__coeff_update="latent", sd__mode="latent")
        trainer.train_and_evaluate(config, OUT)


def device_batches() -> None:
    """The first three global batches of mock CIFAR-10 with the split on the devices; process 0
    saves them to OUT with the device count and the number of devices that hold the split."""
    import tensorflow_datasets as tfds
    from jax.experimental import multihost_utils

    from sd_jax import data

    with tfds.testing.mock_data(num_examples=200):
        pipeline = data.input_pipeline("cifar10", "train", batch_size=32, seed=5, placement="device")
        batches = [next(pipeline) for _ in range(3)]
    saved = {f"{key}{step}": np.asarray(multihost_utils.process_allgather(value, tiled=True))
             for step, batch in enumerate(batches) for key, value in batch.items()}
    if jax.process_index() == 0:
        holders = len(pipeline._on_device.images.sharding.device_set)
        atomic_savez(OUT, dict(saved, devices=np.array(len(jax.devices())), holders=np.array(holders)))


{"step": train_steps, "trainer": train_with_trainer, "device_data": device_batches}[KIND]()
