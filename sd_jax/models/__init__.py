"""Model zoo: networks built by name, dense or SD.

`get("resnet20", num_classes=10)` returns a Flax linen module called as
`model.init(key, x, train=False)` and `model.apply(variables, x, train=True, mutable=["batch_stats"])`
on NHWC float images. Conv and dense layers come from the `conv` and `dense` factory fields, so SD
layers drop in without touching model code (contract in `sd_jax.models.common`).
"""
from sd_jax.models.registry import get, names

__all__ = ["get", "names"]
