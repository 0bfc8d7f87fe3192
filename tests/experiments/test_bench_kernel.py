"""Tests for experiments/bench_kernel.py: its byte counts and, slow, one run in interpret mode."""
import numpy as np
import pytest

from experiments import bench_kernel
from sd_jax.core.report import storage_bits
from sd_jax.kernels import pack


def test_weight_bytes_follow_the_formats():
    coeff, basis, spec = bench_kernel.sd_layer(30, 16)
    packed = pack(coeff, basis, spec, row_tile=16, col_tile=16)  # 10 rows padded to 16: 3 * 16 * 16 codes
    assert packed.hbm_bytes == 3 * 16 * 16 + 4 * 9 * 16
    nonzero = coeff[coeff != 0]
    bits = storage_bits(nonzero.size, np.unique(np.abs(nonzero)).size, coeff.size, basis.size)
    assert bench_kernel.weight_bytes(spec, coeff, basis, packed.hbm_bytes, "bfloat16") == dict(
        dense=30 * 16 * 2, fused=packed.hbm_bytes, rebuild_then_matmul=packed.hbm_bytes + 2 * 30 * 16 * 2,
        sdpack_bytes=-(-bits // 8))


@pytest.mark.slow
def test_bench_on_cpu_checks_correctness_and_times_nothing():
    results = bench_kernel.bench(40, 24, [1], ["float32"], repeats=1)
    (result,) = results.values()
    assert result["interpret"] and result["fused_error"] < 1e-5 and "seconds" not in result
    assert "GPU or TPU" in result["timings"]
