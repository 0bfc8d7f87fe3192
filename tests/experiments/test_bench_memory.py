"""experiments/bench_memory.py measures what it says: a ResNet's compiled train step peaks lower with
low-bit stored activations, and the timing path reports medians and ratios against exact."""

from experiments import bench_memory


def test_measure_reports_lower_peaks_for_fewer_stored_bits_and_times_against_exact():
    figures = bench_memory.measure("resnet20", (16, 16, 1), sd=True, batch_size=16, repeats=1)
    assert figures["bits_exact"]["peak_bytes"] > 0
    # Batch norm inputs as codes and ReLU masks as bits: about half of exact at this small shape (0.53 / 0.50
    # measured), about a quarter at batch 128 on 28 x 28 (BENCHMARKS.md).
    assert figures["peak_memory_ratio_4"] <= figures["peak_memory_ratio_8"] < 0.7
    assert figures["seconds_exact"] > 0
    assert {"seconds_ratio_8", "seconds_ratio_4"} <= set(figures)
