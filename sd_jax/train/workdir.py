"""What a run writes into its workdir, on any path `etils.epath` reaches (a local folder, gs://...).

    config.json    the full resolved config (ConfigDict JSON)
    run.json       {"starts": [...]}: for each start of the run (resumes included) the command line,
                   sys.argv, the git commit of the code (or "unknown") and the time
    metrics.jsonl  one JSON object per logged step, with TensorBoard events in tensorboard/
    summary.json   the trainer's summary

Only the process that reports (`reports()`: process 0) writes these; Orbax writes the checkpoints
from every process. Whole files are written atomically (a temporary sibling, then a rename), so a
reader never sees half a file; `metrics.jsonl` is rewritten whole at each write, since buckets cannot
append.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from sd_jax.io.files import as_path, atomic_write_text as write_text

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVENTS_DIR = "tensorboard"
UNKNOWN_COMMIT = "unknown"
_SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reports() -> bool:
    """Whether this process writes the run's metrics, events and summaries (process 0 does)."""
    return jax.process_index() == 0


def git_commit(directory: str = _SOURCE) -> dict[str, Any]:
    """{"commit": HEAD of the git checkout holding `directory` (UNKNOWN_COMMIT where there is none or git
    is missing), "dirty": whether tracked files differ from it (None when unknown)}."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": UNKNOWN_COMMIT, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def command_line() -> str:
    """The command that started this process, as a shell would take it (`python -m launch.main ...`)."""
    return shlex.join(["python", *sys.orig_argv[1:]])


def describe_run(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Write `config.json` and add this start (command line, sys.argv, commit, time) to `run.json`."""
    write_text(workdir / CONFIG_FILE, config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
    starts = read_json(workdir / RUN_FILE).get("starts", [])
    start = dict(command=command_line(), argv=list(sys.argv), **git_commit(),
                 started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), processes=jax.process_count())
    write_text(workdir / RUN_FILE, json.dumps({"starts": [*starts, start]}, indent=1) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object at `path`, {} when there is no such file; ValueError naming the file when it is
    damaged (not UTF-8 JSON, or not an object)."""
    path = epath.Path(path)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
        record = error
    if not isinstance(record, dict):
        what = f"not JSON ({record})" if isinstance(record, ValueError) else "not a JSON object"
        raise ValueError(f"{path}: {what}; the file is damaged: restore it from a copy, or delete it and rerun "
                         "(sd_jax writes it anew)")
    return record


def _metrics_records(path: epath.Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each line of a `metrics.jsonl`; ValueError naming the file and line when one is not a
    record with a step."""
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            record = json.loads(line)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
            record = error
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise ValueError(f"{path}, line {number}: not a metrics record with a step ({str(record)[:80]}); the file "
                             "is damaged: delete that line and the ones after it (or the file), then rerun")
        records.append((line.decode(), record))
    return records


class _EpathRecordFiles:
    """tensorboardX writer factory: event files opened through epath (a bucket's own client)."""

    def open(self, path: str) -> Any:
        return epath.Path(path).open("wb")

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


class MetricsWriter:
    """TensorBoard events plus one JSON line per logged step; writes nothing where `enabled` is False
    (the processes that do not report).

    A run resumed at `resume_step` keeps the lines of steps up to it and drops the rest (the steps it
    redoes), and replaces the events files of earlier starts by one file holding the kept lines, so
    that neither repeats a step and the run keeps one events file.
    """

    def __init__(self, workdir: epath.Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self._enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter, record_writer  # no TensorFlow needed

        self._path = workdir / METRICS_FILE
        records = _metrics_records(self._path) if self._path.exists() else []
        kept = [(line, record) for line, record in records if record["step"] <= resume_step]
        events = workdir / EVENTS_DIR
        if "://" in str(events):
            record_writer.register_writer_factory(str(events).split("://")[0], _EpathRecordFiles())
        for earlier in events.glob("events.out.tfevents.*"):
            earlier.unlink()
        self._events = SummaryWriter(str(events))
        self._lines = [line for line, _ in kept]
        for _, record in kept:
            self._add_events(record)
        if len(kept) < len(records):
            write_text(self._path, "".join(self._lines))

    def _add_events(self, record: dict[str, float]) -> None:
        for name, value in record.items():
            if name != "step":
                self._events.add_scalar(name, value, record["step"])

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Log `metrics` of `step` to both."""
        if not self._enabled:
            return
        record = dict(step=step, **metrics)
        self._lines.append(json.dumps(record) + "\n")
        self._add_events(record)
        write_text(self._path, "".join(self._lines))

    def close(self) -> None:
        """Flush and close the events file."""
        if self._enabled:
            self._events.close()
