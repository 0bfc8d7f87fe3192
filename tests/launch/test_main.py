import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import default
from sd_jax.commands import decompose

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def params_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "params.npz"
    np.savez(path, **{"stage1/conv/kernel": rng.normal(size=(3, 3, 8, 8)).astype(np.float32) * 0.1,
                      "head/kernel": rng.normal(size=(8, 10)).astype(np.float32), "head/bias": np.zeros(10, np.float32)})
    return str(path)


def test_decompose_prints_table_and_json(params_file, tmp_path):
    config = default.get_config()
    table = decompose(config, params_file, None, as_json=False)
    assert "stage1/conv/kernel" in table and "total" in table
    config.sd.threshold = 4e-3
    config.sd.rules = [("^head$", {"skip": True})]  # a layer name, as in training
    output = str(tmp_path / "sd.npz")
    data = json.loads(decompose(config, params_file, output, as_json=True))
    assert [layer["name"] for layer in data["layers"]] == ["stage1/conv/kernel"]
    assert data["total"]["dense_params"] == 90
    with np.load(output) as saved:  # the SD layers' layout
        assert {"sd_coeff/stage1/conv/coeff", "sd_basis/stage1/conv/basis", "sd_mask/stage1/conv/mask",
                "params/head/kernel", "__report__"} <= set(saved.files)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


@pytest.mark.slow
def test_cli_json_and_errors(params_file):
    done = _cli("--mode=decompose", f"--params={params_file}", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["total"]["decomposed_tensors"] == 2
    missing = _cli("--mode=decompose", "--params=/nonexistent/p.npz")
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad = _cli("--mode=decompose", f"--params={params_file}", "--config.sd.max_coeff=30")
    assert bad.returncode == 2 and "power of two" in bad.stderr
    unknown = _cli("--mode=decompose", f"--params={params_file}", "--config.sd.thresold=1")
    assert unknown.returncode != 0 and "thresold" in unknown.stderr and "Traceback" not in unknown.stderr
    no_params = _cli("--mode=decompose")
    assert no_params.returncode != 0 and "--params" in no_params.stderr
