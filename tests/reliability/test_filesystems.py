"""Filesystem failures end in one line naming the path and the fix; output files honour the umask and
their missing folders are created (issue 13, item 5).

The command-line cases run `launch.main` on a real full or read-only filesystem: a small tmpfs mounted
in a user and mount namespace of its own (`unshare -rm`, no privileges needed where the kernel allows
user namespaces; skipped where it does not). chmod cannot make a read-only directory here: the tests
may run as root.
"""

import errno
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sd_jax import io as sd_io
from sd_jax.io import CheckpointError
from sd_jax.train import train_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ("--mode=train", "--config.input.dataset=mnist", "--config.model.name=mlp", "--config.input.batch_size=16",
         "--config.optim.epochs=2", "--config.ckpt.every_steps=2")


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm (user namespaces)")


@pytest.fixture
def umask():
    """Run the test under umask 027, the old one restored after."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_written_files_honour_the_umask(tmp_path, umask):
    sd_io.atomic_write_text(tmp_path / "report.txt", "x")
    sd_io.atomic_savez(tmp_path / "params.npz", {"a": np.ones(3)})
    sd_io.save_variables(tmp_path / "orbax", {"params": {"a": np.ones(3)}}, report_json="{}")
    written = [tmp_path / "report.txt", tmp_path / "params.npz", tmp_path / "orbax" / "sd_report.json"]
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(umask)}


def test_outputs_in_missing_folders_are_created(tmp_path):
    sd_io.save_variables(tmp_path / "a" / "b" / "sd.npz", {"params": {"a": np.ones(3)}})  # decompose --output
    sd_io.save_variables(tmp_path / "c" / "d" / "sd", {"params": {"a": np.ones(3)}})  # an Orbax directory
    sd_io.atomic_write_text(tmp_path / "e" / "report.txt", "x")  # analyze --output; export writes alike
    assert "params/a" in np.load(tmp_path / "a" / "b" / "sd.npz").files
    assert sd_io.load_variables(tmp_path / "c" / "d" / "sd")["params"]["a"].tolist() == [1, 1, 1]
    assert (tmp_path / "e" / "report.txt").read_text() == "x"


def test_a_failed_write_names_the_file(tmp_path):
    def full(stream):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write to a full disk: no file named

    with pytest.raises(OSError) as error:
        sd_io.atomic_write(tmp_path / "summary.json", full)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "summary.json")
    assert os.listdir(tmp_path) == []  # no temporary left


class _FailingManager:
    """An Orbax CheckpointManager whose saves fail as the one given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def save(self, *args, **kwargs):
        raise self.error

    wait_until_finished = save


@pytest.mark.parametrize("error, expected", [
    (ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 1422344 bytes to file 7: No space left "
                "on device [os_error_code='28']\nmore"), errno.ENOSPC),
    (OSError(errno.EROFS, "Read-only file system", "/x/checkpoints/2.orbax-checkpoint-tmp"), errno.EROFS),
    (TimeoutError("Timeout waiting for key 'step_directory_creation'"), None),
])
def test_a_failed_checkpoint_save_is_one_line_naming_the_directory(tmp_path, error, expected):
    checkpoints = train_checkpoint.TrainCheckpoints(tmp_path / "checkpoints", every_steps=1)
    checkpoints._manager = _FailingManager(error)
    with pytest.raises((OSError, CheckpointError)) as raised:
        checkpoints.wait()
    if expected is None:
        assert isinstance(raised.value, CheckpointError) and "step_directory_creation" in str(raised.value)
        assert str(tmp_path / "checkpoints") in str(raised.value) and "\n" not in str(raised.value)
    else:
        assert raised.value.errno == expected and raised.value.filename == str(tmp_path / "checkpoints")


def _cli_on_tmpfs(mount_options: str, mountpoint, *args) -> subprocess.CompletedProcess:
    """launch.main with `args` under mock data, with a tmpfs (`mount_options`) mounted at `mountpoint`."""
    code = ("import runpy, sys\nimport tensorflow_datasets as tfds\n"
            f"sys.argv = ['launch.main', *{list(args)!r}]\n"
            "with tfds.testing.mock_data(num_examples=64):\n"
            "    runpy.run_module('launch.main', run_name='__main__')\n")
    script = (f"mount -t tmpfs -o {mount_options} tmpfs {shlex.quote(str(mountpoint))} && "
              f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=240)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that failed without a traceback or Orbax's logged errors."""
    assert done.returncode == 2, done.stderr
    for noise in ("Traceback", "Event loop is closed", "RESOURCE_EXHAUSTED", "raised an exception"):
        assert noise not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@needs_namespaces
@pytest.mark.slow
@pytest.mark.parametrize("size", ["600k", "5m"])  # the first save fails; a later one, after two were kept
def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path, size):
    line = _one_error_line(_cli_on_tmpfs(f"size={size}", tmp_path, *TRAIN, f"--workdir={tmp_path / 'run'}"))
    assert str(tmp_path / "run" / "checkpoints") in line and "free space" in line


@needs_namespaces
@pytest.mark.slow
def test_a_read_only_checkpoint_directory_is_one_line_before_training(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    done = _cli_on_tmpfs("ro", tmp_path / "run" / "checkpoints", *TRAIN, f"--workdir={tmp_path / 'run'}")
    line = _one_error_line(done)
    assert str(tmp_path / "run" / "checkpoints") in line and "read-only" in line
    assert "train  step" not in done.stderr  # refused before training, not 5 minutes after


@needs_namespaces
@pytest.mark.slow
def test_a_read_only_workdir_is_one_line(tmp_path):
    line = _one_error_line(_cli_on_tmpfs("ro", tmp_path, *TRAIN, f"--workdir={tmp_path}"))
    assert str(tmp_path / "config.json") in line and "read-only" in line


@needs_namespaces
@pytest.mark.slow
def test_a_full_disk_for_a_command_output_is_one_line(tmp_path):
    params = tmp_path / "params.npz"
    rng = np.random.default_rng(0)
    np.savez(params, **{"head/kernel": rng.normal(size=(512, 512)).astype(np.float32)})
    output = tmp_path / "full" / "sd.npz"
    output.parent.mkdir()
    line = _one_error_line(_cli_on_tmpfs("size=64k", output.parent, "--mode=decompose", f"--params={params}",
                                         f"--output={output}"))
    assert str(output) in line and "free space" in line
