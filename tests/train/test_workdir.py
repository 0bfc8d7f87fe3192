"""Tests for sd_jax/train/workdir.py and the trainer's workdir: a run describes itself (config,
command line, commit), writes through etils.epath (a bucket as well as a local folder), and only the
process that reports writes metrics, events and summaries."""
import json
import os
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds
from etils import epath

from sd_jax.train import trainer, workdir
from sd_jax.train.train_checkpoint import TrainCheckpoints
from tests.train.tiny_config import tiny_config


@pytest.fixture
def tiny_data():
    with tfds.testing.mock_data(num_examples=64):
        yield


def test_describe_run_writes_the_config_and_adds_each_start_to_run_json(tmp_path, monkeypatch):
    config = tiny_config(model__sd=True, sd__rules=[("^head", {"threshold": 0.5})])
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-m", "launch.main", "--mode=train", "--workdir=a b"])
    run = workdir.as_path(tmp_path)
    workdir.describe_run(run, config)
    workdir.describe_run(run, config)  # resumed
    written = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
    assert written.model.sd is True and written.input.dataset == "mnist" and written.sd.threshold == config.sd.threshold
    assert [list(rule) for rule in written.sd.rules] == [["^head", {"threshold": 0.5}]]
    starts = json.loads((tmp_path / "run.json").read_text())["starts"]
    assert len(starts) == 2
    assert starts[0]["command"] == "python -m launch.main --mode=train '--workdir=a b'"
    assert starts[0]["argv"] == sys.argv and starts[0]["processes"] == 1
    assert len(starts[0]["commit"]) == 40 and isinstance(starts[0]["dirty"], bool)  # this checkout's HEAD
    assert sorted(os.listdir(tmp_path)) == ["config.json", "run.json"]  # no temporary files left


def test_the_commit_is_unknown_outside_a_git_checkout_or_without_git(tmp_path, monkeypatch):
    assert workdir.git_commit(str(tmp_path)) == {"commit": "unknown", "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    assert workdir.git_commit() == {"commit": "unknown", "dirty": None}


def test_metrics_writer_keeps_earlier_lines_and_a_silent_one_writes_nothing(tmp_path):
    run = workdir.as_path(tmp_path / "run")
    writer = workdir.MetricsWriter(run)
    writer.write(1, {"loss": 2.0})
    writer.close()
    writer = workdir.MetricsWriter(run, resume_step=1)  # a run resumed at step 1
    writer.write(2, {"loss": 1.0, "learning_rate": 0.1})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "learning_rate": 0.1}]
    assert os.listdir(tmp_path / "run" / "tensorboard")[0].startswith("events")
    silent = workdir.MetricsWriter(workdir.as_path(tmp_path / "silent"), enabled=False)
    silent.write(1, {"loss": 2.0})
    silent.close()
    assert not (tmp_path / "silent").exists()


def test_only_the_reporting_process_writes_metrics_events_and_summaries(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(workdir, "reports", lambda: False)  # as process 1 of 2
    summary = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert 0 <= summary["accuracy"] <= 1
    assert os.listdir(tmp_path) == ["checkpoints"]  # Orbax's, written for every process


def test_the_trainer_writes_a_bucket_workdir_through_epath(tmp_path, tiny_data, monkeypatch):
    """A gs:// workdir through a stand-in bucket backend (epath.testing.mock_epath serving gs://bucket/
    from a local folder). Orbax writes array data through tensorstore's own GCS driver, which cannot be
    stood in for offline, so its checkpoints go to the stand-in folder by path; that the trainer hands
    Orbax the bucket path is checked."""
    local = lambda path: os.fspath(path).replace("gs://", f"{tmp_path}/", 1)
    one_path = lambda original, path, *args, **kwargs: original(local(path), *args, **kwargs)
    two_paths = lambda original, path, destination, **kwargs: original(local(path), local(destination), **kwargs)
    mocks = dict.fromkeys(("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                           "stat", "walk"), one_path)
    mocks.update(dict.fromkeys(("copy", "rename", "replace"), two_paths))
    handed = []

    def checkpoints(directory, **options):
        handed.append(os.fspath(directory))
        return TrainCheckpoints(local(directory), **options)

    monkeypatch.setattr(trainer, "TrainCheckpoints", checkpoints)
    monkeypatch.chdir(tmp_path)
    with epath.testing.mock_epath(**mocks):
        summary = trainer.train_and_evaluate(tiny_config(), "gs://bucket/run")
    bucket = tmp_path / "bucket" / "run"
    assert handed == ["gs://bucket/run/checkpoints"] and not (tmp_path / "gs:").exists()
    assert sorted(os.listdir(bucket)) == ["checkpoints", "config.json", "metrics.jsonl", "run.json", "summary.json",
                                          "tensorboard"]
    assert json.loads((bucket / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    lines = [json.loads(line) for line in (bucket / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "learning_rate" in line] == [1, 2, 3, 4]
    assert os.path.getsize(bucket / "tensorboard" / os.listdir(bucket / "tensorboard")[0]) > 100


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = workdir.as_path(tmp_path) / "summary.json"
    workdir.write_text(target, "old")

    def fail(self, destination):
        raise OSError("bucket unreachable")

    monkeypatch.setattr(type(target), "replace", fail)
    with pytest.raises(OSError, match="unreachable"):
        workdir.write_text(target, "new")
    assert os.listdir(tmp_path) == ["summary.json"] and target.read_text() == "old"
