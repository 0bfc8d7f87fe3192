"""Serve what was trained: packed SD models back into runnable ones, and exported for other runtimes.

- `save(path, model, variables, description)` packs an SD model (`--mode=export` does it for checkpoints);
  `load(path)` gives a `ServedModel` whose `apply(images)` returns the trained model's logits bit for bit.
- `export_artifact(served, path)` writes a `jax.export` artifact that runs without sd_jax.

The walk-through is docs/serving.md.
"""

from sd_jax.serve.exported import export_artifact, export_function, load_artifact
from sd_jax.serve.packed import (
    IntegerModel, ModelDescription, ServedModel, load, model_tensors, pack_model, save,
)

__all__ = ["IntegerModel", "ModelDescription", "ServedModel", "export_artifact", "export_function", "load",
           "load_artifact", "model_tensors", "pack_model", "save"]
