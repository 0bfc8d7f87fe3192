import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_two_devices_equal_one_process_with_four(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = str(tmp_path / "single.npz")
    subprocess.run([sys.executable, WORKER, single], env=env, check=True, timeout=300)
    coordinator = f"localhost:{_free_port()}"
    multi = str(tmp_path / "multi.npz")
    workers = [subprocess.Popen([sys.executable, WORKER, multi, coordinator, "2", str(i)], env=env)
               for i in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    with np.load(single) as one, np.load(multi) as two:
        assert int(one["devices"]) == 4 and int(two["devices"]) == 4
        assert set(one.files) == set(two.files)
        for key in one.files:
            np.testing.assert_allclose(one[key], two[key], rtol=1e-5, atol=1e-6)
