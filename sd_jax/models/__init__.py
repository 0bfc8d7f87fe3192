"""Model zoo: networks built by name, dense or SD.

`get("resnet20", num_classes=10)` returns a Flax linen module called as
`model.init(key, x, train=False)` and `model.apply(variables, x, train=True, mutable=["batch_stats"])`
on NHWC float images; `get(name, num_classes=10, sd=True)` is the same network with SD layers (or
`sd=sd_jax.nn.SDRules(...)` to pick them by name). Conv and dense layers come from the `conv` and
`dense` factory fields, so SD layers drop in without touching model code (contract in
`sd_jax.models.common`). Blocks are nested modules, so variables are nested dicts
(`params['stage1_block0']['conv1']['kernel']`); `upgrade_layout` nests variables saved with the
earlier flat layer names (`params['stage1_block0/conv1']`). `synthetic_variables` fills seeded
stand-in variables without running the initialisers, for tests and benchmarks.
"""
from sd_jax.models.common import upgrade_layout
from sd_jax.models.registry import get, layer_names, names, options, probe_shape, stored_activation_options
from sd_jax.models.synthetic import synthetic_variables

__all__ = ["get", "layer_names", "names", "options", "probe_shape", "stored_activation_options", "synthetic_variables",
           "upgrade_layout"]
