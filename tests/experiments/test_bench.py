"""Tests for the train-step benchmark's PyTorch baseline (experiments/torch_baseline.py), its skip
messages in experiments/bench_train_step.py, and scripts/gpu_run.sh's checks before any GPU work."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_train_step, torch_baseline
from sd_jax import models
from sd_jax.core import blocking, pow2
from sd_jax.nn import SDRules
from sd_jax.nn.layers import rebuild_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_RUN = os.path.join(ROOT, "scripts", "gpu_run.sh")


def _batch(size=4):
    return {"image": jnp.ones((size, 32, 32, 3), jnp.float32), "label": jnp.zeros((size,), jnp.int32)}


def test_torch_step_is_skipped_with_a_message_without_torch(monkeypatch, capsys):
    monkeypatch.setattr(torch_baseline, "available", lambda: False)
    assert bench_train_step._torch_step("resnet18", _batch(), 0.01) is None
    assert "torch is not installed" in capsys.readouterr().out


def test_torch_step_is_skipped_with_a_message_for_a_model_without_a_port(monkeypatch, capsys):
    monkeypatch.setattr(torch_baseline, "available", lambda: True)
    assert bench_train_step._torch_step("resnet20", _batch(), 0.01) is None
    assert "no PyTorch port" in capsys.readouterr().out


def test_build_rejects_a_model_without_a_port():
    with pytest.raises(ValueError, match="no PyTorch port of model 'vgg19'"):
        torch_baseline.build("vgg19", 10)


def test_torch_quantizer_matches_sd_jax_and_passes_the_gradient_through():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).normal(0, 1, 4096).astype(np.float32) * np.float32(8.0)
    values[:5] = [0.0, 1e-3, -64.0, 0.75, 4.0]
    coeff = torch.from_numpy(values).requires_grad_()
    quantized = torch_baseline.quantize_ste(coeff, 4e-3, 32.0)
    expected = np.asarray(pow2.quantize_pow2(jnp.asarray(values), 4e-3, 32.0))
    np.testing.assert_array_equal(quantized.detach().numpy(), expected)
    (quantized * torch.arange(4096.0)).sum().backward()
    np.testing.assert_array_equal(coeff.grad.numpy(), np.arange(4096.0, dtype=np.float32))


@pytest.mark.parametrize("shape,kind", [((3, 3, 96, 8), "conv"), ((1, 1, 64, 8), "conv"), ((512, 10), "dense")])
def test_torch_rebuild_matches_sd_jax(shape, kind):
    """Same C, B and mask: the torch kernel is sd_jax's kernel in PyTorch's layout (padding dropped)."""
    torch = pytest.importorskip("torch")
    spec = blocking.block_spec(shape, kind)
    rng = np.random.default_rng(1)
    coeff = rng.normal(0, 0.1, spec.block_shape).astype(np.float32)
    basis = rng.normal(0, 1, (spec.num_blocks, spec.k, spec.k)).astype(np.float32)
    mask = rng.random(spec.block_shape) < 0.8
    kernel = np.asarray(rebuild_kernel(jnp.asarray(coeff), jnp.asarray(basis), jnp.asarray(mask), spec,
                                       mode="latent", threshold=4e-3, max_coeff=32.0))
    torch_shape = (shape[-1], shape[-2], *shape[:2]) if kind == "conv" else (shape[1], shape[0])
    got = torch_baseline.rebuild(torch.from_numpy(coeff), torch.from_numpy(basis), torch.from_numpy(mask).float(),
                                 torch_shape, 4e-3, 32.0).numpy()
    expected = kernel.transpose(3, 2, 0, 1) if kind == "conv" else kernel.T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_resnet18_has_the_blocks_of_the_sd_jax_model():
    """Layer by layer (in order), the same C shapes: both sides rebuild the same blocks every step."""
    pytest.importorskip("torch")
    model = models.get("resnet18", num_classes=10, sd=SDRules(mode="latent"))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    jax_shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(abstract["sd_coeff"]))
    torch_model = torch_baseline.build("resnet18", 10)
    torch_shapes = sorted(tuple(p.shape) for name, p in torch_model.named_parameters() if name.endswith(".C"))
    assert torch_shapes == jax_shapes
    assert len(torch_shapes) == 21  # stem, 16 block convs, 3 shortcuts, the classifier


@pytest.mark.slow
def test_torch_step_trains():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    step = torch_baseline.TorchStep("resnet18", rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                                    rng.integers(0, 10, 8), num_classes=10, lr=0.05)
    losses = [step.step() for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert step.describe()["torch_threads"] >= 1


def _gpu_run(tmp_path, *args, **env):
    environment = {name: value for name, value in os.environ.items() if name != "SD_JAX_CIFAR10_JPEG"}
    environment.update({"SD_JAX_PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
                        "SD_JAX_GPU_WORK": str(tmp_path / "work"), **env})
    return subprocess.run(["bash", GPU_RUN, *args], capture_output=True, text=True, env=environment, timeout=120)


def test_gpu_run_needs_the_archive(tmp_path):
    result = _gpu_run(tmp_path)
    assert result.returncode == 2
    assert "no CIFAR-10 JPEG archive" in result.stderr
    missing = _gpu_run(tmp_path, str(tmp_path / "nothing.tar.gz"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_gpu_run_stops_before_any_work_without_a_gpu(tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is visible here")
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    result = _gpu_run(tmp_path, str(archive))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "JAX sees no GPU" in result.stdout + result.stderr
    assert "== machine" in result.stdout
    assert not (tmp_path / "out" / "gpu_run.json").exists()  # nothing ran past the check
    assert (tmp_path / "out" / "gpu_run.log").read_text().count("JAX sees no GPU") == 1


@pytest.mark.slow
def test_bench_model_reports_the_xla_defaults_side_and_skips_torch_without_a_port(capsys):
    result = bench_train_step.bench_model("lenet5", batch_size=4, repeats=1, lr=0.01, breakdown=False,
                                          baseline="torch", xla_defaults=True)
    assert set(result["all_seconds"]) == {"dense", "sd", "sd_latent", "sd_latent_xla_defaults"}
    assert result["sd_latent_over_xla_defaults"] > 0 and "torch_seconds" not in result
    assert all(np.isfinite(loss) for loss in result["final_loss"].values())
    if torch_baseline.available():
        assert "no PyTorch port" in capsys.readouterr().out


STAND_IN_PYTHON = """#!/usr/bin/env bash
# Stands in for a GPU machine's Python: records each call, passes the GPU check, fakes each phase.
echo "$*" >> "$CALLS"
case "$*" in
  "-") cat > /dev/null; echo "jax 0.0, backend gpu" ;;
  --version) echo "Python 3.12.0" ;;
  *experiments.bench_train_step*) echo "{\\"resnet20\\": {\\"sd_over_dense\\": 1.0}}" ;;
  *sd_jax.data.prepare*) echo prepared ;;
  *launch.main*)
    workdir=$(printf '%s\\n' "$@" | sed -n 's/^--workdir=//p')
    mkdir -p "$workdir" && echo '{"accuracy": 0.5}' > "$workdir/summary.json" && echo '{}' > "$workdir/metrics.jsonl" ;;
esac
"""


def test_gpu_run_runs_every_phase_and_gathers_the_outputs(tmp_path):
    """With a stand-in for the GPU machine's Python: the commands each phase runs, and the output folder."""
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    result = _gpu_run(tmp_path, str(archive), SD_JAX_PYTHON=str(python), SD_JAX_GPU_EPOCHS="3",
                      CALLS=str(tmp_path / "calls"))
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any("bench_train_step" in c and "--dtype=float32" in c for c in calls)
    assert any("bench_train_step" in c and "--dtype=bfloat16" in c for c in calls)
    assert any("paper.py:cifar10_jpeg,resnet20,dense" in c and "--config.optim.stop_epoch=3" in c for c in calls)
    assert any("paper.py:cifar10_jpeg,resnet20,sd_scratch,tuned" in c for c in calls)
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "bench_bfloat16.json", "bench_float32.json", "dense/metrics.jsonl", "dense/summary.json",
        "gpu_run.json", "gpu_run.log", "sd/metrics.jsonl", "sd/summary.json"]
    summary = json.loads((out / "gpu_run.json").read_text())
    assert set(summary["phases"]) == {"bench_float32", "bench_bfloat16", "prepare", "train_dense", "train_sd"}
    assert summary["epochs"] == 3 and all(p["exit_code"] == 0 for p in summary["phases"].values())
    assert json.loads((out / "bench_float32.json").read_text()) == {"resnet20": {"sd_over_dense": 1.0}}
