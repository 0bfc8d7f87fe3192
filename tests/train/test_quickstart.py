import json
import os

import pytest

from experiments import quickstart
from experiments.configs import paper
from experiments.configs import quickstart as quickstart_config


pytestmark = pytest.mark.usefixtures("mock_tfds")


def test_the_stages_are_the_paper_settings_of_one_dense_config():
    dense, sd = quickstart_config.get_config("dense"), quickstart_config.get_config("sd")
    assert (dense.setting, dense.model.sd, sd.setting, sd.recipe, sd.model.sd) == (
        "dense", False, "inference_only", "tuned", True)
    assert (sd.sd.threshold, sd.optim.switch_bar, sd.optim.weight_decay, sd.optim.lr, sd.optim.epochs) == (
        paper.TUNED["decomposed_threshold"], paper.TUNED["decomposed_switch_bar"],
        paper.TUNED["decomposed_weight_decay"], paper.TUNED["inference_only_lr"], 1)
    assert "finetune" not in dense and quickstart_config.get_config().to_dict() == dense.to_dict()
    with pytest.raises(ValueError, match="stage 'sparse'"):
        quickstart_config.get_config("sparse")


def _tiny(config):
    config.input.dataset = "fashion_mnist"
    config.input.batch_size = 16
    config.input.eval_batch_size = 32
    config.model.name = "mlp"
    return config


def test_quickstart_runs_end_to_end_at_a_tiny_size(tmp_path, capfd):
    dense, sd = (_tiny(quickstart_config.get_config(stage)) for stage in ("dense", "sd"))
    dense.optim.epochs = 1
    sd.sd.threshold = 4e-3
    summary = quickstart.run(dense, sd, str(tmp_path))
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written) == {"dense_accuracy", "sd_accuracy", "compression_ratio", "density", "seconds", "dataset",
                            "model", "setting", "recipe"}
    assert written == json.loads(json.dumps(summary))
    assert summary["compression_ratio"] > 1 and 0 < summary["density"] <= 1
    assert (summary["setting"], summary["recipe"]) == ("inference_only", "tuned")
    assert set(summary["seconds"]) == {"dense_training", "decompose_and_finetune", "total"}
    sd_config = json.loads((tmp_path / "sd" / "config.json").read_text())
    assert sd_config["init"]["from_params"] == os.path.join(tmp_path, "dense", "checkpoints")
    for run in (tmp_path, tmp_path / "dense", tmp_path / "sd"):
        assert {"config.json", "run.json"} <= set(os.listdir(run))
    stderr = capfd.readouterr().err
    assert "quickstart 2/2: decomposing the dense model" in stderr
    assert stderr.index("quickstart 2/2") < stderr.index("decompose: the dense kernels of")
