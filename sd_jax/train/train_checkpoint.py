"""Training checkpoints with Orbax `CheckpointManager`: asynchronous saves, the last K and the best kept.

A checkpoint holds everything needed to resume bit for bit: the `TrainState` (step, every variable
collection, optimizer state with the bucket-switch counters and SWA average, PRNG key) as item
"state", the input pipeline's position as the JSON item "data", and the trainer's evaluation record
(best accuracy so far and its step) as the JSON item "evaluation". A save's `metrics` are written
with it, so the best checkpoint is still known, and kept, after a restart. Saves run in the
background; `wait` (or `close`) before the process exits. The directory is any path `etils.epath`
reaches (a local folder, gs://...); every process of a multi-process run calls `save` and `restore`
alike, and Orbax has the primary process write what is written once.

A save that fails in the background (disk full, a read-only or forbidden directory) is raised by the
next `save`, `wait` or `close` as an `OSError` with the errno and the checkpoint directory (or, where
the storage names no errno, a `CheckpointError`), one line; Orbax's own tracebacks of it from its
background threads are not logged. `check_writable` finds a directory that cannot take a save before
a run trains.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sd_jax.io import CheckpointError
from sd_jax.train.step import TrainState
from sd_jax.train.workdir import as_path


ITEMS = ("state", "data", "evaluation")


_NOT_FOR_USERS = (
    "did not provide metrics",  # a save without metrics: only evaluated checkpoints carry them
    # a failed background save, with its traceback, once per thread: TrainCheckpoints raises it as one line
    "_SignalingThread.run() raised an exception", "in background save thread", "Save Finalize thread",
)
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")  # how TensorStore names the errno of a failed write


class _OrbaxNoise(logging.Filter):
    """Drops Orbax's log records that `_NOT_FOR_USERS` lists."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOT_FOR_USERS)


logging.getLogger("absl").addFilter(_OrbaxNoise())


def _to_saveable(state: TrainState) -> TrainState:
    return state.replace(key=jax.random.key_data(state.key))  # Orbax stores raw key data, not typed keys


class TrainCheckpoints:
    """Save every `every_steps` steps (and when forced); keep the `keep_last` newest and the
    `keep_best` best by `best_metric` (`best_mode` "max" or "min")."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_steps: int,
        keep_last: int = 2,
        keep_best: int = 1,
        best_metric: str = "accuracy",
        best_mode: str = "max",
    ) -> None:
        if every_steps < 1 or keep_last < 1 or keep_best < 0:
            raise ValueError("every_steps and keep_last must be >= 1 and keep_best >= 0")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r}; pass 'max' or 'min'")
        policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Orbax writes a save's metrics to disk only with a best_fn; BestN reads them back on restart.
            best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode,
        )
        self.directory = as_path(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, step: int, state: TrainState, *, data_state: dict[str, Any] | None = None,
             evaluation: dict[str, float] | None = None, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Start saving (asynchronously); True when a save was started.

        `metrics` rank the checkpoint among the best (a checkpoint without them is kept only while it
        is among the `keep_last` newest); `evaluation` is the trainer's record, read back by `evaluation`.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), data=ocp.args.JsonSave(data_state or {}),
            evaluation=ocp.args.JsonSave(evaluation or {}),
        )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        with self._save_failures():
            return self._manager.save(step, args=args, metrics=metrics, force=force)

    def check_writable(self) -> None:
        """Raise OSError (naming the directory) where a checkpoint cannot be written, before a run trains."""
        probe = self.directory / f".write-check-{uuid.uuid4().hex}"
        with self._save_failures():
            probe.write_bytes(b"")
            probe.unlink()

    @contextlib.contextmanager
    def _save_failures(self) -> Iterator[None]:
        """Orbax's errors of a failed save as OSError naming the directory (the errno TensorStore reports
        in its message where it has none) or, without an errno, CheckpointError: one line each."""
        try:
            yield
        except OSError as error:
            if error.errno is None:
                raise CheckpointError(f"{self.directory}: a checkpoint save failed: {error}") from None
            raise OSError(error.errno, error.strerror, str(self.directory)) from None
        except (ValueError, RuntimeError, TimeoutError) as error:
            code = _OS_ERROR_CODE.search(str(error))
            if code:
                number = int(code.group(1))
                raise OSError(number, os.strerror(number), str(self.directory)) from None
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{self.directory}: a checkpoint save failed: {first_line}") from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with `step` (None for a checkpoint saved without them)."""
        return self._manager.metrics(step)

    def evaluation(self, step: int) -> dict[str, Any]:
        """The evaluation record saved with `step` ({} when there is none, e.g. an older checkpoint)."""
        if not (self.directory / str(step) / "evaluation").is_dir():
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(evaluation=ocp.args.JsonRestore()))
        return dict(restored["evaluation"] or {})

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]] | None:
        """The state and data position at `step` (default: the newest good one), or None when there is none.

        `template` is a state of the same model and optimizer (e.g. freshly initialised). Without
        `step`, a damaged newest checkpoint (a file missing or truncated) is deleted with a warning
        naming it and the older step restored instead, so that training redoes its steps; when no
        checkpoint restores (another model, or all damaged), CheckpointError names the newest.
        """
        steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
        for tried, candidate in enumerate(steps):
            restored = self._restore_step(template, candidate)
            if restored is not None:
                break
            if tried + 1 < len(steps):
                logging.warning("%s: checkpoint of step %d does not restore (damaged); deleting it and "
                                "falling back to step %d", self.directory, candidate, steps[tried + 1])
        else:
            if not steps:
                return None
            raise CheckpointError(
                f"{self.directory}: cannot restore step {steps[0]}: the checkpoint is damaged or comes from a "
                "different model or optimizer; use a fresh --workdir or the config that wrote it"
            )
        for damaged in steps[:tried]:
            self.delete(damaged)
        state = restored["state"]
        state = state.replace(key=jax.random.wrap_key_data(np.asarray(state.key)))
        return state, dict(restored["data"] or {})

    def _restore_step(self, template: TrainState, step: int) -> Any:
        """Orbax's restore of `step`, or None where it fails (its errors, TensorStore's among them, go to
        the debug log, not to the user)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as error:  # Orbax raises many types for a mismatched or damaged checkpoint
            logging.debug("%s: restore of step %d failed: %r", self.directory, step, error)
            return None

    def delete(self, step: int) -> None:
        """Remove the checkpoint of `step` (one found bad after it was written)."""
        self._manager.delete(step)

    def wait(self) -> None:
        """Block until every save in flight is on disk."""
        with self._save_failures():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._save_failures():
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
