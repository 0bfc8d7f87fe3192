"""Progress lines of a run: the stage, step of total, images per second, an ETA and the latest figures.

On a terminal one line is rewritten in place ("\\r"); where the output is not a terminal (a SLURM log,
a pipe) every update is a full line of its own, so logs read line by line. Results (an evaluation's
accuracy) are printed as full lines as they come. Only the process that reports (process 0 of a
multi-process run) prints anything.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def duration(seconds: float) -> str:
    """`seconds` as h:mm:ss (m:ss under an hour)."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Prints the progress of one stage at a time (`start`, then `update`) and results (`report`)."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._enabled = enabled
        self._clock = clock
        self._in_place = enabled and self._stream.isatty()
        self._open_line = False
        self.stage, self.total, self._first, self._done, self._images_per_step = "", 0, 0, 0, 0
        self._started, self._measuring = 0.0, False
        self.rate = 0.0  # steps a second at the last update

    def start(self, stage: str, total: int, *, done: int = 0, images_per_step: int = 0) -> None:
        """Begin `stage` ("train", "eval", "swa", "decompose", ...) of `total` steps, `done` of them already
        done (a resumed run)."""
        self._end_line()
        self.stage, self.total, self._first, self._done = stage, total, done, done
        self._images_per_step, self._measuring = images_per_step, False
        self._started = self._clock()

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return (self._done - self._first) / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, *, transient: bool = False, **figures: float) -> None:
        """The progress line after `done` of the stage's steps, with `figures` (e.g. loss=0.41); a
        `transient` line (the steps of an evaluation) shows only on a terminal, not in logs. The rate
        counts from the stage's first update on, so that compiling the first step does not skew it."""
        now, self._done = self._clock(), done
        self.rate = rate = self._rate(now)
        if not self._measuring:
            self._first, self._started, self._measuring = done, now, True
        if transient and not self._in_place:
            return
        parts = [self.stage, f"step {done}/{self.total}"]
        if rate > 0:
            parts.append(f"{rate * self._images_per_step:.1f} images/s" if self._images_per_step
                         else f"{rate:.2f} steps/s")
            parts.append(f"ETA {duration((self.total - done) / rate)}")
        parts += [f"{name} {value:.4g}" for name, value in figures.items()]
        self._write("  ".join(parts), in_place=True)

    def track(self, stage: str, items: Iterable[T], total: int) -> Iterator[T]:
        """`items` (`total` of them) as stage `stage`, with a transient progress line after each."""
        self.start(stage, total)
        for done, item in enumerate(items, 1):
            yield item
            self.update(done, transient=True)

    def report(self, text: str) -> None:
        """`text` as a full line of its own (an evaluation's result, a stage that begins)."""
        self._end_line()
        self._write(text, in_place=False)

    def close(self) -> None:
        """End a line left open by an in-place update."""
        self._end_line()

    def _write(self, text: str, *, in_place: bool) -> None:
        if not self._enabled:
            return
        if in_place and self._in_place:
            self._stream.write(f"\r\033[K{text}")
            self._open_line = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def _end_line(self) -> None:
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False
