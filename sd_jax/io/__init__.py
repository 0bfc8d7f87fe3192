"""Parameter I/O below `train` and `cost`: variable trees to and from `.npz` and Orbax, atomic writes,
every path through `etils.epath` (local disks and cloud buckets alike)."""

from sd_jax.io.files import as_path, atomic_write, atomic_write_text
from sd_jax.io.variables import (
    CheckpointError, atomic_savez, check_finite, check_fits, flatten, load_params, load_variables, save_decomposition,
    save_variables, unflatten, upgrade_sd_layout,
)

__all__ = ["CheckpointError", "as_path", "atomic_savez", "atomic_write", "atomic_write_text",
           "check_finite", "check_fits", "flatten", "load_params", "load_variables", "save_decomposition", "save_variables",
           "unflatten", "upgrade_sd_layout"]
