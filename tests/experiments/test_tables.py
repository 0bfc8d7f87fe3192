import json
import os

from experiments import tables


def test_tables_render_runs_and_skip_broken_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(dict(
        accuracy=0.9, compression_ratio=9.5, density=0.45, seconds=120.0, epochs=4, dataset="cifar10_jpeg",
        model="resnet20", sd=True, setting="plain")))
    (tmp_path / "a" / "command.txt").write_text(
        "python -m launch.main --mode=finetune --config=experiments/configs/paper.py:cifar10,resnet20,inference_only")
    (tmp_path / "a" / "energy.json").write_text(json.dumps(dict(summary=dict(
        inference_energy_ratio=3.5, training_energy_ratio=1.25), layers=[])))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps(dict(
        accuracy=0.8, dataset="cifar10_jpeg", model="resnet20", sd=False, setting="plain", backend="cpu",
        devices=1, cpus=2)))
    (tmp_path / "b" / "energy.json").write_text("[1, 2")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "summary.json").write_text(json.dumps(dict(
        dense_accuracy=0.91, sd_accuracy=0.905, compression_ratio=9.7, density=0.46, seconds={"total": 560.0})))
    (tmp_path / "q" / "sd").mkdir()
    (tmp_path / "q" / "sd" / "summary.json").write_text(json.dumps(dict(accuracy=0.905)))  # a stage: not a row
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"loss": 1.0}))
    rows, skipped = tables.collect(str(tmp_path))
    assert len(rows) == 3 and len(skipped) == 3
    assert any("not readable JSON" in message for message in skipped)
    assert any("energy left out" in message for message in skipped)
    text = tables.markdown(rows, "# Results\nnotes")
    assert text.startswith("# Results\nnotes")
    assert "| cifar10_jpeg | resnet20 | inference_only |  | 90.00 | 9.50x | 0.450 | 3.50x | 1.25x | 4 | 120 |" in text
    assert "| dense plain |  | 80.00 | 1.00x | 1.000 |  |  |  | 0 | cpu x1, 2 CPU cores |" in text
    assert "90.50" in text and "91.00" in text and "10.56x" in text and "--mode=finetune" in text
    tables.plot(rows, str(tmp_path / "plot.png"))
    assert os.path.getsize(tmp_path / "plot.png") > 1000


def test_the_analyzer_count_of_an_sd_run_gives_its_compression_and_density(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "summary.json").write_text(json.dumps(dict(
        accuracy=0.8, compression_ratio=3.0, density=1.0, dataset="cifar10_jpeg", model="resnet20", sd=True)))
    (tmp_path / "sd" / "energy.json").write_text(json.dumps(dict(summary=dict(
        storage_ratio=5.5, sd_density=0.75, inference_energy_ratio=2.0, training_energy_ratio=1.5))))
    rows, _ = tables.collect(str(tmp_path))
    assert (rows[0]["compression"], rows[0]["density"]) == (5.5, 0.75)
