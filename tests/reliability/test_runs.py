"""Runs that are finished, damaged, resumed or hit a filesystem failure (issue 13, items 4 and 5)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from sd_jax.io import CheckpointError
from sd_jax.train import trainer
from tests.train.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("mock_tfds")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (4 steps, checkpoints of steps 2 and 4) and the text of its metrics."""
    workdir = tmp_path_factory.mktemp("finished")
    trainer.train_and_evaluate(tiny_config(), workdir)
    return workdir


def _copy(source, destination):
    subprocess.run(["cp", "-a", f"{source}/.", str(destination)], check=True)
    return destination


def _metric_steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _truncate_largest_state_file(workdir, step):
    files = [os.path.join(folder, name) for folder, _, names in os.walk(workdir / "checkpoints" / str(step) / "state")
             for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as stream:
        stream.truncate(os.path.getsize(largest) // 2)


def test_a_finished_run_rerun_says_it_is_complete_and_returns_its_summary(finished, tmp_path, capfd):
    workdir = _copy(finished, tmp_path)
    metrics = (workdir / "metrics.jsonl").read_text()
    summary = trainer.train_and_evaluate(tiny_config(), workdir)
    assert summary == json.loads((workdir / "summary.json").read_text())
    assert "is complete (step 4 of 4)" in capfd.readouterr().err
    assert (workdir / "metrics.jsonl").read_text() == metrics  # nothing was redone


@pytest.mark.slow
def test_a_finished_quickstart_rerun_keeps_its_summary(tmp_path, capfd):
    from experiments import quickstart

    dense, sd = tiny_config(), tiny_config(model__sd=True, sd__threshold=4e-3)
    first = quickstart.run(dense, sd, str(tmp_path))
    assert quickstart.run(dense, sd, str(tmp_path)) == first
    assert capfd.readouterr().err.count("is complete") == 2


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, caplog, damage):
    workdir = _copy(finished, tmp_path)
    if damage == "truncate":
        _truncate_largest_state_file(workdir, 4)
    else:
        os.remove(workdir / "checkpoints" / "4" / "state" / "_METADATA")
    (workdir / "summary.json").unlink()
    with caplog.at_level(logging.WARNING):
        summary = trainer.train_and_evaluate(tiny_config(), workdir)
    assert "step 4 does not restore" in caplog.text and "falling back to step 2" in caplog.text
    original = json.loads((finished / "summary.json").read_text())
    assert (summary["steps"], summary["accuracy"], summary["loss"]) == (4, original["accuracy"], original["loss"])
    assert _metric_steps(workdir) == _metric_steps(finished)


def test_a_checkpoint_that_cannot_restore_is_one_line_without_tensorstore_internals(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    for step in (2, 4):
        _truncate_largest_state_file(workdir, step)
    with pytest.raises(CheckpointError) as error:
        trainer.train_and_evaluate(tiny_config(), workdir)
    message = str(error.value)
    assert "cannot restore step 4" in message and "--workdir" in message
    assert "tensorstore" not in message.lower() and "\n" not in message


def test_a_resume_keeps_metrics_of_the_restored_steps_and_one_events_file(tmp_path, monkeypatch):
    original, calls = trainer._global_batch, []

    def preempt(batch, mesh):  # killed before step 4, after the metrics of step 3 and the checkpoint of step 2
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated preemption")
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "_global_batch", preempt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(tiny_config(), tmp_path)
    assert _metric_steps(tmp_path) == [1, 2, 3]
    monkeypatch.setattr(trainer, "_global_batch", original)
    trainer.train_and_evaluate(tiny_config(), tmp_path)
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 4]  # the evaluation of step 4 is the last line
    assert len(os.listdir(tmp_path / "tensorboard")) == 1


def _cli(*args, failing_writes=None):
    """launch.main with `args`; with `failing_writes` (an errno name) every workdir file write fails so."""
    inject = "" if failing_writes is None else (
        "import errno\nfrom sd_jax.train import workdir\n"
        "def fail(path, text):\n"
        f"    raise OSError(errno.{failing_writes}, os.strerror(errno.{failing_writes}), str(path))\n"
        "workdir.write_text = fail\n")
    code = (f"import os, runpy, sys\n{inject}"
            f"sys.argv = ['launch.main', *{list(args)!r}]\nrunpy.run_module('launch.main', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def _one_error_line(done):
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "run"
    path.write_text("")
    line = _one_error_line(_cli("--mode=train", f"--workdir={path}"))
    assert str(path) in line and "pass a directory" in line


@pytest.mark.parametrize("errno_name, fix", [("ENOSPC", "free space"), ("EACCES", "permission denied"),
                                             ("EROFS", "read-only")])
def test_a_failing_write_into_the_workdir_is_one_line(tmp_path, errno_name, fix):
    line = _one_error_line(_cli("--mode=train", f"--workdir={tmp_path}", failing_writes=errno_name))
    assert str(tmp_path / "config.json") in line and fix in line
