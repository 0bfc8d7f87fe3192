"""Training runs killed with SIGKILL at seeded random moments, checkpoint saves included, and resumed
until they finish, end bitwise equal to an uninterrupted run (issue 13, item 7).

Each start is a process of its own (`kill_worker.py`: the tiny MLP on mock MNIST). A moment is drawn
from a seeded generator: either a delay after the start's n-th progress line ("train  step i/N"), which
lands in a step, a metrics write, an evaluation or a save, or a delay after the start's n-th checkpoint
save begins (Orbax's temporary `<step>.orbax-checkpoint-tmp` directory appears), which lands inside
the save. The moments are reproducible, the exact instruction a kill hits is not. A run that finishes
before its next moment is compared as it is, and the remaining moments go to a fresh workdir.
Compared with the reference: every kept checkpoint (state arrays bit for bit, data position,
evaluation record), metrics.jsonl without the wall-clock `steps_per_second`, summary.json without
`seconds` and `date`, and one TensorBoard events file.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_worker.py")
PROGRESS_LINE = re.compile(r"^train  step \d+/")
SAVE_IN_FLIGHT = ".orbax-checkpoint-tmp"
TIMING = ("steps_per_second", "seconds", "date")  # the only fields that depend on the clock


class Moment(NamedTuple):
    """When to kill a start: `delay` seconds after its `count`-th event of `kind` ("step": a progress
    line; "save": a checkpoint save begins)."""

    kind: str
    count: int
    delay: float


class Killed(NamedTuple):
    """A finished run and what its starts went through."""

    workdir: Path
    kills: int
    in_save: int  # kills that left a save unfinished (its temporary directory behind)


def moments(seed: int, kills: int) -> list[Moment]:
    """`kills` moments from `seed`, half of them in checkpoint saves (within 30 ms of the save's start; a
    save of the tiny run takes 100 ms or more)."""
    rng = random.Random(seed)
    kinds = ["save" if i % 2 else "step" for i in range(kills)]
    rng.shuffle(kinds)
    return [Moment(kind, rng.randint(1, 2), rng.uniform(0, 0.03 if kind == "save" else 0.15)) for kind in kinds]


def _saves_in_flight(workdir: Path) -> set[str]:
    try:
        return {name for name in os.listdir(workdir / "checkpoints") if name.endswith(SAVE_IN_FLIGHT)}
    except FileNotFoundError:
        return set()


def _read(stream: Iterable[str], lines: list[str], progress_lines: list[str]) -> None:
    """Collect a start's stderr lines, and its progress lines apart."""
    for line in stream:
        lines.append(line)
        if PROGRESS_LINE.match(line):
            progress_lines.append(line)


def _start(workdir: Path, epochs: int, env: dict[str, str], moment: Moment | None = None) -> str | None:
    """Run one start of the worker; kill it at `moment`. Returns the save it interrupted ("" for a kill
    outside a save), or None when it finished first."""
    process = subprocess.Popen([sys.executable, WORKER, str(workdir), str(epochs)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr, progress_lines = [], []
    reader = threading.Thread(target=_read, args=(process.stderr, stderr, progress_lines))
    reader.start()
    in_flight, saves, event = _saves_in_flight(workdir), [], None
    while process.poll() is None and moment is not None:
        if event is None:
            now_in_flight = _saves_in_flight(workdir)
            saves += sorted(now_in_flight - in_flight)  # a leftover of an earlier start is no new save
            in_flight = now_in_flight
            if (len(progress_lines) if moment.kind == "step" else len(saves)) >= moment.count:
                event = time.monotonic()
        elif time.monotonic() >= event + moment.delay:
            process.send_signal(signal.SIGKILL)
            process.wait()
            reader.join()
            return next((name for name in saves if name in _saves_in_flight(workdir)), "")
        time.sleep(0.001)
    process.wait(timeout=300)
    reader.join()
    assert process.returncode == 0, "".join(stderr)
    return None


def kill_and_resume(root: Path, epochs: int, plan: list[Moment], env: dict[str, str]) -> list[Killed]:
    """Start, kill at the next moment of `plan` and start again until `plan` is used up, then let the
    run finish; a run that finishes before its moment ends there and the moment goes to the next run."""
    runs, plan = [], list(plan)
    while plan:
        workdir, kills, in_save = root / f"run{len(runs)}", 0, 0
        while plan:
            interrupted = _start(workdir, epochs, env, plan[0])
            if interrupted is None:
                break
            plan.pop(0)
            kills, in_save = kills + 1, in_save + bool(interrupted)
        else:
            _start(workdir, epochs, env)
        runs.append(Killed(workdir, kills, in_save))
    return runs


def _checkpoint(directory: Path) -> dict[str, bytes | np.ndarray]:
    """A checkpoint's state arrays by path and its JSON items as bytes."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(directory / "state").item_metadata.tree
    state = checkpointer.restore(directory / "state", restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    arrays = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    return dict(arrays, **{item: (directory / item / "metadata").read_bytes() for item in ("data", "evaluation")})


def _without_timing(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMING}


def assert_identical(workdir: Path, reference: Path) -> None:
    """Everything `workdir`'s run left (checkpoints, metrics, summary, events) is what `reference`'s did."""
    steps = sorted(int(name) for name in os.listdir(reference / "checkpoints") if name.isdigit())
    assert sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()) == steps
    for step in steps:
        got, expected = _checkpoint(workdir / "checkpoints" / str(step)), _checkpoint(reference / "checkpoints" / str(step))
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if isinstance(value, bytes):
                assert got[name] == value, f"step {step}: {name}"
            else:
                assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), f"step {step}: {name}"
    metrics, summaries = ([[_without_timing(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
                           for run in (workdir, reference)],
                          [_without_timing(json.loads((run / "summary.json").read_text())) for run in (workdir, reference)])
    assert metrics[0] == metrics[1] and summaries[0] == summaries[1]
    assert len(os.listdir(workdir / "tensorboard")) == 1


EPOCHS = 2  # 8 steps; checkpoints after steps 2, 4 (evaluated), 6 and 8 (evaluated)


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    """The workers' environment: one compilation cache for every start of the module."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, environment) -> Path:
    """The uninterrupted run every killed run is compared with."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _start(workdir, EPOCHS, environment)
    return workdir


def _killed_runs_are_identical(root: Path, reference: Path, seed: int, kills: int, env: dict[str, str]) -> None:
    """Kill and resume runs `kills` times, compare each finished run with `reference`, print the tally."""
    runs = kill_and_resume(root, EPOCHS, moments(seed, kills), env)
    identical = 0
    for run in runs:
        assert_identical(run.workdir, reference)
        identical += run.kills
    in_save = sum(run.in_save for run in runs)
    print(f"kills: {kills}, identical: {identical} ({in_save} inside a checkpoint save, {len(runs)} run(s))")
    assert identical == kills and in_save >= 1


def test_three_kills_resume_bitwise_equal(tmp_path, reference, environment):
    _killed_runs_are_identical(tmp_path, reference, seed=0, kills=3, env=environment)


@pytest.mark.slow
def test_twenty_kills_resume_bitwise_equal(tmp_path, reference, environment):
    _killed_runs_are_identical(tmp_path, reference, seed=1, kills=20, env=environment)
