"""Several processes (hosts, or one process per GPU): `jax.distributed` initialisation.

Call `initialize` once, before any other JAX call. With explicit arguments it uses them; with
`auto=True` JAX detects the cluster (SLURM, TPU pod slices, Open MPI, ...); with neither it does
nothing, so single-process runs need no set-up. After it, `jax.devices()` lists every process's
devices and the "data" mesh of `sd_jax.train.sharding` spans them all.
"""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start `jax.distributed` when asked to; True when it was started."""
    explicit = [coordinator_address, num_processes, process_id]
    if all(value is None for value in explicit) and not auto:
        return False
    if not auto and any(value is None for value in explicit):
        missing = [name for name, value in zip(("coordinator_address", "num_processes", "process_id"), explicit)
                   if value is None]
        raise ValueError(f"several processes need coordinator_address, num_processes and process_id; missing "
                         f"{missing} (or pass --distributed_auto on SLURM / TPU pods to detect them)")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
