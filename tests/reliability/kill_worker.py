"""One start of a tiny training run, for the SIGKILL tests (tests/reliability/test_kill.py).

    python tests/reliability/kill_worker.py WORKDIR EPOCHS

Trains the dense MLP of tests/train/tiny_config.py on mock MNIST (64 images, 4 steps an epoch) for
EPOCHS epochs into WORKDIR, resuming from its checkpoints as any rerun does. One simulated CPU device,
so every start compiles the same programs; the caller may share JAX's compilation cache between starts
(JAX_COMPILATION_CACHE_DIR) to save the compile time, which does not change what is computed.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.modules["torch"] = None  # tensorboardX imports PyTorch when it can (3 s a start); it writes events without it

import tensorflow_datasets as tfds  # noqa: E402

from sd_jax.train import trainer  # noqa: E402
from tests.train.tiny_config import tiny_config  # noqa: E402

with tfds.testing.mock_data(num_examples=64):
    trainer.train_and_evaluate(tiny_config(optim__epochs=int(sys.argv[2])), sys.argv[1])
