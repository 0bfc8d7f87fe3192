"""Benchmark: the input pipeline's host and device paths on CIFAR-10 shapes, and how long a step waits.

    python -m experiments.bench_input [--batch=128] [--timed_batches=40] [--step_ms=100] [--json]

Data: the real CIFAR-10 training split as prepared `cifar10_jpeg` (in `SD_JAX_DATA_DIR` or TFDS's
folder, `python -m sd_jax.data.prepare cifar10_jpeg --source ...`) when it is there, else 50,000
synthetic 32x32x3 images (`tfds.testing.mock_data` under the name `cifar10`); the record says which.
Both paths make training batches with augmentation (4-pixel pad, random crop, flip), normalised
float32 images and int32 labels:
- host: `placement="host"`, numpy batches made on the host (`prefetch=0`, so each call makes one);
- device: `placement="device"`, the split held as uint8 on the devices and batches made there by
  one jitted function, each call ended with `jax.block_until_ready`.
Host and device calls alternate (A B A B ...) in one process after one warm-up call each (the device
path's compilation, reported as `device_first_batch_seconds`); medians of `--timed_batches` calls give
`host_images_per_second` and `device_images_per_second`.
Wait time: a consumer takes `--timed_batches` batches, and after each runs a stand-in step of fixed
duration (`--step_ms` of sleep, which frees the CPU as an accelerator step would); the median time
it waits in `next()` is `host_wait_seconds` (the default `prefetch=2`: batches made in a background
thread meanwhile), `host_wait_seconds_no_prefetch` and `device_wait_seconds`.
`load_seconds`: reading and decoding the split once (each pipeline reads it).

Runs in about 2 minutes on the shared 2-core CPU. The last line with --json is one JSON object with
one entry, "cifar10", holding the figures and the machine.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import jax
import tensorflow_datasets as tfds
from absl import app, flags

from experiments import benchmarking
from experiments.benchmarking import report
from sd_jax import data

BATCH = 128
_BATCHES = flags.DEFINE_integer("timed_batches", 40, "Timed batches per measurement.")
_STEP_MS = flags.DEFINE_float("step_ms", 100.0, "Duration of the stand-in train step, in milliseconds.")

REAL = "cifar10_jpeg"
SYNTHETIC_EXAMPLES = 50_000


@contextlib.contextmanager
def cifar10() -> Iterator[tuple[str, str]]:
    """(dataset name, what it is): the prepared real CIFAR-10 when present, else synthetic data."""
    try:
        data.open_split(REAL, "train")
        yield REAL, f"{REAL}: the real CIFAR-10 training split (50,000 JPEG images, decoded once)"
    except data.DatasetNotFoundError:
        with tfds.testing.mock_data(num_examples=SYNTHETIC_EXAMPLES):
            yield "cifar10", f"synthetic: {SYNTHETIC_EXAMPLES} random 32x32x3 images (tfds.testing.mock_data)"


def _next_seconds(pipeline: data.Pipeline) -> float:
    """Time to get the next batch ready (on the devices, for device batches)."""
    start = time.perf_counter()
    jax.block_until_ready(next(pipeline))
    return time.perf_counter() - start


def waits(pipeline: data.Pipeline, batches: int, step_seconds: float) -> list[float]:
    """Seconds a consumer waits in `next()` for each of `batches` batches, running a stand-in step of
    `step_seconds` after each."""
    seconds = []
    for _ in range(batches):
        seconds.append(_next_seconds(pipeline))
        time.sleep(step_seconds)
    return seconds


def measure(name: str, batch: int, batches: int, step_seconds: float) -> dict[str, Any]:
    """The figures of the module docstring for dataset `name`."""
    common = dict(batch_size=batch, seed=0, process_index=0, process_count=1)
    start = time.perf_counter()
    host = data.input_pipeline(name, "train", prefetch=0, **common)
    load_seconds = time.perf_counter() - start
    on_device = data.input_pipeline(name, "train", placement="device", **common)
    first_batch_seconds = _next_seconds(on_device)
    _next_seconds(host)
    host_seconds, device_seconds = [], []
    for _ in range(batches):  # A B A B ...
        host_seconds.append(_next_seconds(host))
        device_seconds.append(_next_seconds(on_device))
    host_images = batch / statistics.median(host_seconds)
    device_images = batch / statistics.median(device_seconds)
    prefetching = data.input_pipeline(name, "train", **common)
    return dict(
        batch=batch, batches=batches, step_seconds=step_seconds, load_seconds=load_seconds,
        host_images_per_second=host_images, device_images_per_second=device_images,
        device_over_host=device_images / host_images, device_first_batch_seconds=first_batch_seconds,
        host_wait_seconds=statistics.median(waits(prefetching, batches, step_seconds)),
        host_wait_seconds_no_prefetch=statistics.median(waits(host, batches, step_seconds)),
        device_wait_seconds=statistics.median(waits(on_device, batches, step_seconds)),
    )


def main(argv: list[str]) -> None:
    del argv
    with cifar10() as (name, source):
        figures = measure(name, benchmarking.batch(BATCH), _BATCHES.value, _STEP_MS.value / 1000)
    figures["data"] = source
    print(f"data: {source}")
    print(f"host {figures['host_images_per_second']:.0f} images/s, device {figures['device_images_per_second']:.0f} "
          f"images/s ({figures['device_over_host']:.1f}x); wait per {_STEP_MS.value:g} ms step: host "
          f"{figures['host_wait_seconds'] * 1e3:.2f} ms (prefetch) / {figures['host_wait_seconds_no_prefetch'] * 1e3:.2f} "
          f"ms (none), device {figures['device_wait_seconds'] * 1e3:.2f} ms")
    report({"cifar10": figures}, as_json=benchmarking.JSON.value)


if __name__ == "__main__":
    app.run(main)
