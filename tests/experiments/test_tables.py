"""Tests for experiments/tables.py: rows from run folders, the markdown, the JSON rows, the plot."""
import json
import os
import subprocess
import sys

import pytest

from experiments import tables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_COMMAND = "python -m launch.main --mode={mode} --config=experiments/configs/paper.py:cifar10_jpeg,resnet20,{setting}"
OLD_ENERGY = dict(storage_ratio=5.5, sd_density=0.75, inference_energy_ratio=3.5, training_energy_ratio=1.25)
NEW_ENERGY = dict(OLD_ENERGY, inference_energy_ratio_vs_int8=0.9, training_energy_ratio_vs_int8=1.05)


def _run(root, name, summary, command=None, energy=None):
    """A run folder with a hand-made summary.json, and command.txt / energy.json when given."""
    folder = root / name
    folder.mkdir()
    (folder / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if command is not None:
        (folder / "command.txt").write_text(command)
    if energy is not None:
        (folder / "energy.json").write_text(energy if isinstance(energy, str) else json.dumps(dict(summary=energy)))


def _summary(**fields):
    return dict(dict(accuracy=0.8, compression_ratio=3.0, density=1.0, seconds=120.0, epochs=4,
                     dataset="cifar10_jpeg", model="resnet20", sd=True, setting="plain"), **fields)


@pytest.fixture
def runs(tmp_path):
    _run(tmp_path, "old_sd", _summary(), PAPER_COMMAND.format(mode="train", setting="sd_8bit"), OLD_ENERGY)
    _run(tmp_path, "new_sd", _summary(setting="sd_bucket_switch", recipe="reference", best_accuracy=0.83),
         energy=NEW_ENERGY)
    _run(tmp_path, "dense", _summary(sd=False, compression_ratio=1.0, backend="cpu", devices=1, cpus=2),
         PAPER_COMMAND.format(mode="train", setting="dense"))
    _run(tmp_path, "unknown", dict(accuracy=0.7))
    return tmp_path


def _rows(root):
    return {os.path.basename(row["run"]): row for row in json.loads(tables.to_json(tables.collect(str(root))[0]))["rows"]}


def test_json_rows_hold_exactly_the_schema_keys(runs):
    rows = _rows(runs)
    assert set(rows) == {"old_sd", "new_sd", "dense", "unknown"}
    for row in rows.values():
        assert list(row) == list(tables.ROW_KEYS)
    assert rows["unknown"] == dict({key: None for key in tables.ROW_KEYS}, accuracy=0.7, run=str(runs / "unknown"))


def test_a_run_with_and_without_energy_json(runs):
    rows = _rows(runs)
    assert {key: rows["new_sd"][key] for key in tables.ENERGY_RATIOS} == {
        key: NEW_ENERGY[key] for key in tables.ENERGY_RATIOS}
    assert (rows["new_sd"]["compression_ratio"], rows["new_sd"]["density"]) == (5.5, 0.75)  # the analyzer's count
    assert rows["old_sd"]["inference_energy_ratio"] == 3.5 and rows["old_sd"]["inference_energy_ratio_vs_int8"] is None
    assert all(rows["dense"][key] is None for key in tables.ENERGY_RATIOS)
    assert (rows["dense"]["compression_ratio"], rows["dense"]["density"]) == (1.0, 1.0)


def test_setting_recipe_and_best_accuracy(runs):
    rows = _rows(runs)
    assert rows["new_sd"]["setting"] == "sd_bucket_switch"  # any setting the run records
    assert (rows["new_sd"]["recipe"], rows["new_sd"]["best_accuracy"]) == ("reference", 0.83)
    assert rows["old_sd"]["setting"] == "sd_8bit"  # recorded "plain": the command's config argument
    assert (rows["old_sd"]["recipe"], rows["old_sd"]["best_accuracy"]) == (None, None)
    assert rows["dense"]["setting"] == "dense"


def test_markdown_shows_both_baselines_and_marks_a_missing_one(runs):
    text = tables.markdown(tables.collect(str(runs))[0], "# Results\nnotes")
    assert text.startswith("# Results\nnotes")
    assert ("| cifar10_jpeg | resnet20 | sd_bucket_switch | reference |  | 80.00 | 83.00 |  | 5.50x | 0.750 | "
            "3.50x | 0.90x | 1.25x | 1.05x |  |  | 4 | 120 |  | `new_sd` |") in text
    assert "| sd_8bit |  |  | 80.00 |  |  | 5.50x | 0.750 | 3.50x | n/a | 1.25x | n/a |  |  | 4 |" in text
    assert "| dense |  |  | 80.00 |  |  | 1.00x | 1.000 |  |  |  |  |  |  | 4 | 120 | cpu x1, 2 CPU cores | `dense` |" in text
    assert "n/a: the run's `energy.json` predates the dense 8-bit baseline" in text
    assert "--mode=train" in text and "10.56x" in text


def test_a_run_that_describes_itself_gives_its_command_commit_and_setting(tmp_path):
    """The trainer's run.json and config.json, not a hand-written command.txt."""
    first = dict(command="python -m launch.main --mode=train --workdir=runs/x", commit="a" * 40, dirty=False)
    last = dict(first, commit="b" * 40, dirty=True)
    _run(tmp_path, "described", _summary())  # setting "plain" in the summary
    (tmp_path / "described" / "run.json").write_text(json.dumps({"starts": [first, last]}))
    (tmp_path / "described" / "config.json").write_text(json.dumps({"setting": "sd_scratch", "input": {}}))
    _run(tmp_path, "adaptation", _summary())
    (tmp_path / "adaptation" / "config.json").write_text(json.dumps({"setting": "", "input": {"setting": "adaptation"}}))
    _run(tmp_path, "broken_description", _summary(), PAPER_COMMAND.format(mode="train", setting="sd_8bit"))
    (tmp_path / "broken_description" / "run.json").write_text("{not json")
    rows = {os.path.basename(row["run"]): row for row in tables.collect(str(tmp_path))[0]}
    assert rows["described"]["command"] == (f"python -m launch.main --mode=train --workdir=runs/x   # at commit "
                                            f"{'b' * 40}, with uncommitted changes")
    assert rows["described"]["setting"] == "sd_scratch" and rows["adaptation"]["setting"] == "adaptation"
    assert rows["broken_description"]["setting"] == "sd_8bit"  # the command.txt of a run from before run.json
    assert f"# at commit {'b' * 40}" in tables.markdown(list(rows.values()))


def test_a_trained_run_is_a_row_with_its_own_command(tmp_path, monkeypatch):
    import sys

    import tensorflow_datasets as tfds

    from sd_jax.train import trainer
    from tests.train.tiny_config import tiny_config

    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "launch.main", "--mode=train", "--workdir=runs/tiny"])
    config = tiny_config()
    config.setting = "dense"
    config.sd.stored_activation_bits = 8
    with tfds.testing.mock_data(num_examples=64):
        trainer.train_and_evaluate(config, str(tmp_path / "tiny"))
    (row,) = tables.collect(str(tmp_path))[0]
    assert row["command"].startswith("python -m launch.main --mode=train --workdir=runs/tiny   # at commit ")
    assert (row["setting"], row["dataset"], row["model"]) == ("dense", "mnist", "mlp")
    assert row["stored_activation_bits"] == 8 and row["peak_memory_ratio"] > 0  # measured from the compiled step


def test_quickstart_runs_and_broken_files(tmp_path):
    _run(tmp_path, "q", dict(dense_accuracy=0.91, sd_accuracy=0.905, compression_ratio=9.7, density=0.46,
                             seconds={"total": 560.0}))
    (tmp_path / "q" / "sd").mkdir()
    (tmp_path / "q" / "sd" / "summary.json").write_text(json.dumps(dict(accuracy=0.905)))  # a stage: not a row
    _run(tmp_path, "broken", "{not json")
    _run(tmp_path, "other", {"loss": 1.0})
    _run(tmp_path, "bad_energy", _summary(), energy="[1, 2")
    rows, skipped = tables.collect(str(tmp_path))
    assert len(rows) == 2 and len(skipped) == 3
    assert any("not readable JSON" in message for message in skipped)
    assert any("energy left out" in message for message in skipped)
    quickstart = next(row for row in rows if row["run"].endswith("q"))
    assert (quickstart["setting"], quickstart["accuracy"], quickstart["seconds"]) == ("inference_only", 0.905, 560.0)
    assert "| 91.00 | 90.50 |" in tables.markdown(rows)
    assert next(row for row in json.loads(tables.to_json(rows))["rows"] if row["run"].endswith("q")
                )["stored_activation_bits"] is None  # every key, quickstart rows too
    tables.plot(rows, str(tmp_path / "plot.png"))
    assert os.path.getsize(tmp_path / "plot.png") > 1000


def test_command_line_prints_one_json_object(runs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.tables", f"--runs={runs}", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == 4 and all(list(row) == list(tables.ROW_KEYS) for row in rows)
    markdown, png = tmp_path / "RESULTS.md", tmp_path / "results.png"
    result = subprocess.run([sys.executable, "-m", "experiments.tables", f"--runs={runs}", f"--output={markdown}",
                             f"--plot={png}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| dataset |" in markdown.read_text() and png.stat().st_size > 1000


def test_integer_records_render_beside_the_float_and_dense_figures(tmp_path):
    folder = tmp_path / "integer_c10"
    folder.mkdir()
    record = dict(command="python -m experiments.eval_integer --params=runs/x", dataset="cifar10_jpeg",
                  model="resnet20", dense_top1=84.11, float_top1=82.83, integer_top1=82.73, difference_points=0.1,
                  agreement=99.2, test_images=10000)
    (folder / tables.INTEGER_FILE).write_text(json.dumps(record))
    (records,) = tables.collect_integer(str(tmp_path))
    text = tables.markdown([], integer=[records])
    assert "| cifar10_jpeg | resnet20 | 84.11 | 82.83 | 82.73 | 0.10 | 99.20 | 10000 | `integer_c10` |" in text
    assert "python -m experiments.eval_integer --params=runs/x" in text
    assert "Integer-only" not in tables.markdown([])


def test_a_language_run_carries_bits_per_char(tmp_path):
    _run(tmp_path, "lm", _summary(dataset="fortunes_chars", model="transformer_lm", setting="sd_scratch",
                                  bits_per_char=2.25))
    row = _rows(tmp_path)["lm"]
    assert (row["dataset"], row["setting"], row["bits_per_char"]) == ("fortunes_chars", "sd_scratch", 2.25)
    assert "| 2.250 |" in tables.markdown(tables.collect(str(tmp_path))[0])
