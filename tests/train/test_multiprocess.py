import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sd_jax import io as sd_io

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(kind: str, single: str, multi: str) -> None:
    """The worker alone with 4 devices, then as 2 processes with 2 devices each (jax.distributed, gloo)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, WORKER, kind, single], env=env, check=True, timeout=300)
    coordinator = f"localhost:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, WORKER, kind, multi, coordinator, "2", str(i)], env=env)
               for i in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]


def test_two_processes_with_two_devices_equal_one_process_with_four(tmp_path):
    single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
    _run("step", single, multi)
    with np.load(single) as one, np.load(multi) as two:
        assert int(one["devices"]) == 4 and int(two["devices"]) == 4
        assert set(one.files) == set(two.files)
        for key in one.files:
            np.testing.assert_allclose(one[key], two[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 24 s; test_workdir checks process-0-only outputs fast, the bare step test two processes
def test_trainer_in_two_processes_equals_one_process(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    _run("trainer", single, multi)
    one, two = (json.loads(open(os.path.join(d, "summary.json")).read()) for d in (single, multi))
    assert one["devices"] == two["devices"] == 4 and one["steps"] == two["steps"]
    for key in ("accuracy", "loss", "density", "compression_ratio"):
        assert one[key] == pytest.approx(two[key], rel=1e-5), key
    # Only process 0 writes metrics and events: as many lines, and one events file, as one process.
    lines = [open(os.path.join(d, "metrics.jsonl")).read().splitlines() for d in (single, multi)]
    assert len(lines[0]) == len(lines[1]) and len(os.listdir(os.path.join(multi, "tensorboard"))) == 1
    assert json.loads(open(os.path.join(multi, "run.json")).read())["starts"][0]["processes"] == 2
    for key, value in sd_io.flatten(sd_io.load_variables(os.path.join(single, "checkpoints"))).items():
        other = sd_io.flatten(sd_io.load_variables(os.path.join(multi, "checkpoints")))[key]
        np.testing.assert_allclose(value, other, rtol=1e-5, atol=1e-6, err_msg=key)
