import json
import os

import pytest
import tensorflow_datasets as tfds

from experiments import quickstart
from experiments.configs import quickstart as quickstart_config


@pytest.fixture(autouse=True)
def _mock():
    with tfds.testing.mock_data(num_examples=64):
        yield


def test_quickstart_runs_end_to_end_at_a_tiny_size(tmp_path):
    config = quickstart_config.get_config()
    config.input.dataset = "fashion_mnist"
    config.input.batch_size = 16
    config.input.eval_batch_size = 32
    config.model.name = "mlp"
    config.optim.epochs = 1
    config.finetune.epochs = 1
    config.finetune.threshold = 4e-3
    summary = quickstart.run(config, str(tmp_path))
    with open(os.path.join(tmp_path, "summary.json")) as stream:
        written = json.load(stream)
    assert set(written) == {"dense_accuracy", "sd_accuracy", "compression_ratio", "density", "seconds"}
    assert written == json.loads(json.dumps(summary))
    assert summary["compression_ratio"] > 1 and 0 < summary["density"] <= 1
    assert set(summary["seconds"]) == {"dense_training", "decompose_and_finetune", "total"}
