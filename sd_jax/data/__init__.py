"""TFDS-based input pipelines and local builders for the offline dataset copies.

    from sd_jax import data
    train = data.input_pipeline("cifar10", "train", batch_size=128, seed=0)
    batch = next(train)            # {"image": float32 (128, 32, 32, 3), "label": int32 (128,)}
    state = train.get_state()      # three ints for the checkpoint; train.set_state(state) resumes

Offline copies: `python -m sd_jax.data.prepare fashion_mnist_idx` (Debian package
dataset-fashion-mnist) and `... prepare cifar10_jpeg --source cifar10-jpeg.tar.gz`.
"""

from sd_jax.data import builders  # registers the local TFDS builders by name
from sd_jax.data.pipeline import DatasetNotFoundError, Pipeline, input_pipeline, open_split
from sd_jax.data.registry import DatasetSpec, get, names
from sd_jax.data.builders import SourceNotFoundError, prepare

__all__ = [
    "DatasetNotFoundError", "DatasetSpec", "Pipeline", "SourceNotFoundError", "builders", "get",
    "input_pipeline", "names", "open_split", "prepare",
]
