"""What every benchmark reports beside its figures (see docs/benchmarking.md)."""

from __future__ import annotations

import json
import os
import platform
import resource
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import optax
from absl import flags

# Flags every benchmark takes, defined once so that benchmarks import side by side (tests do).
JSON = flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
REPEATS = flags.DEFINE_integer("repeats", None, "Timed runs per measured function after the compiling one "
                               "(default: the benchmark's own).")


MODELS = flags.DEFINE_list("models", None, "Zoo models to measure (default: the benchmark's own).")
BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: the benchmark's own).")


def repeats(default: int) -> int:
    """`--repeats`, or the benchmark's `default` when it is not given."""
    return default if REPEATS.value is None else REPEATS.value


def models(default: Sequence[str]) -> list[str]:
    """`--models`, or the benchmark's `default` when it is not given."""
    return list(default) if MODELS.value is None else MODELS.value


def batch(default: int) -> int:
    """`--batch`, or the benchmark's `default` when it is not given."""
    return default if BATCH.value is None else BATCH.value


def machine() -> dict[str, Any]:
    """What ran: devices, backend, versions, host threads, load, peak memory so far."""
    return dict(
        devices=[str(d) for d in jax.devices()], backend=jax.default_backend(), jax=jax.__version__,
        jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None, flax=flax.__version__,
        optax=optax.__version__, python=platform.python_version(), host_threads=os.cpu_count(),
        load_average=os.getloadavg(), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def report(results: dict[str, dict[str, Any]], *, as_json: bool) -> None:
    """Print the machine, then (with `as_json`) one JSON object, one entry per model, as the last line."""
    info = machine()
    print(f"machine: {info}")
    if as_json:
        print(json.dumps({name: dict(r, machine=info) for name, r in results.items()}))


def each_model(names: Sequence[str], measure: Callable[[str], dict[str, Any]],
               describe: Callable[[str, dict[str, Any]], str]) -> None:
    """`measure` each model, printing `describe(name, figures)` as each lands, then `report` them all
    (one JSON object with --json)."""
    results = {}
    for name in names:
        results[name] = measure(name)
        print(describe(name, results[name]), flush=True)
    report(results, as_json=JSON.value)
