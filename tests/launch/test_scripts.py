import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch")
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "NUM_PROCESSES")) and k != "ZONE"}


@pytest.mark.parametrize("script, missing", [("slurm.sh", "SLURM_JOB_ID SLURM_NTASKS SLURM_JOB_NODELIST"),
                                             ("tpu_pod.sh", "TPU_NAME ZONE"), ("local.sh", "NUM_PROCESSES")])
def test_scripts_name_the_missing_cluster_variables(script, missing):
    done = subprocess.run(["bash", os.path.join(LAUNCH, script), "--mode=train"], env=CLEAN,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"missing {missing}" in done.stderr


def test_tpu_script_names_only_what_is_missing():
    done = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], env=dict(CLEAN, TPU_NAME="pod"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "missing ZONE;" in done.stderr
