"""Tests for sd_jax/cost/analysis.py: the views, their totals and ratios, the report formats."""
import json

import numpy as np
import pytest

from sd_jax.cost import analysis, comparison, hardware, integer


@pytest.fixture(scope="module")
def result(network):
    return comparison.analysis_of(network, "resnet20", comparison.COST_DEFAULTS)


def test_dense_8_bit_baseline_costs_less_than_float32(network, result):
    s = analysis.summary(result)
    for total in ("inference_energy", "storage_bits", "training_energy", "training_storage_bits"):
        assert s[f"dense_int8_{total}"] < s[f"dense_{total}"]
    for ratio in analysis.RATIOS:
        assert 0 < s[f"{ratio}_ratio_vs_int8"] < s[f"{ratio}_ratio"]
    kernels = sum(layer.weights for layer in network.layers)
    assert s["dense_int8_storage_bits"] == 8 * kernels + analysis.OTHER_PARAM_BITS * network.other_params


def test_sd_at_8_bits_against_dense_8_bit_differs_only_in_weight_traffic_and_rebuild(network, result):
    hw = hardware.hardware(weight_bits=8, activation_bits=8)  # the SD side's and the baseline's numerics
    sd, int8 = result.sd, result.dense_int8
    for part in ("mac", "register"):
        np.testing.assert_allclose(sd["inference"][part], int8["inference"][part], rtol=1e-6)
    saved_bits = int8["storage"]["weights"] - sd["storage"]["weights"]  # every layer's weights fit the buffer
    for part, per_bit in (("dram", hw.dram_per_bit), ("buffer", hw.buffer_per_bit)):
        np.testing.assert_allclose(int8["inference"][part] - sd["inference"][part], saved_bits * float(per_bit),
                                   rtol=1e-4, atol=1e-3 * float(per_bit))
    rebuild = [layer.sd.nonzeros * layer.sd.k * float(hw.add) for layer in network.layers]
    np.testing.assert_allclose(sd["inference"]["rebuild"], rebuild, rtol=1e-6)
    assert not np.any(int8["inference"]["rebuild"])
    np.testing.assert_allclose(sd["storage"]["activations"], int8["storage"]["activations"], rtol=1e-6)


def test_without_the_baseline_the_summary_has_no_int8_figures(network):
    plain = analysis.analyze(network, "resnet20", unit="pJ", dense_hardware=hardware.hardware(),
                             sd_hardware=hardware.hardware(weight_bits=8, activation_bits=8))
    assert not any("int8" in key for key in analysis.summary(plain))
    assert "dense 8-bit" not in analysis.format_text(plain)


def test_reports_show_both_baselines(result):
    summary = json.loads(analysis.to_json(result))["summary"]
    assert {"inference_energy_ratio", "training_energy_ratio", "inference_energy_ratio_vs_int8",
            "training_energy_ratio_vs_int8"} <= set(summary)
    text, markdown = analysis.format_text(result), analysis.format_markdown(result)
    ratio = f"{summary['inference_energy_ratio_vs_int8']:.2f}x"
    assert "dense 8-bit / SD" in text and ratio in text
    assert "| total | dense | dense 8-bit | SD | dense / SD | dense 8-bit / SD |" in markdown


def test_reports_give_both_mac_counts_and_name_the_one_energy_charges(network, result):
    s = analysis.summary(result)
    assert s["macs"] == sum(layer.macs for layer in network.layers) > s["effective_macs"]
    assert s["energy_macs"] == "effective_macs"
    text, markdown = analysis.format_text(result), analysis.format_markdown(result)
    headline = f"{s['macs']:,} MACs per image, {s['effective_macs']:,} without taps on zero padding"
    assert headline in text and headline in markdown and "energies charge effective_macs" in text
    stem = analysis.layer_rows(result)[0]
    assert (stem["macs"], stem["effective_macs"]) == (network.layers[0].macs, network.layers[0].effective_macs)
    assert analysis.to_csv(result).startswith("layer,kind,kernel,macs,effective_macs,")


def test_integer_figures_are_those_of_cost_integer(network, result):
    s = analysis.summary(result)
    ops = integer.integer_ops(network)
    assert s["integer_int8_macs"] == sum(layer.effective_macs for layer in network.layers) == int(ops.int8_macs.sum())
    steps = sum(layer.sd.nonzeros * layer.sd.k for layer in network.layers)
    assert s["integer_rebuild_shifts"] == s["integer_rebuild_adds"] == steps
    assert s["integer_requantizations"] == sum(l.weights + l.outputs for l in network.layers)
    options = comparison.COST_DEFAULTS
    parts = integer.integer_inference_energy(network, options["table"], buffer_kib=options["buffer_kib"],
                                             pe_count=options["pe_count"], dataflow=options["dataflow"])
    energy = float(sum(np.sum(part) for part in parts.values()))
    np.testing.assert_allclose(s["integer_inference_energy"], energy, rtol=1e-5)
    np.testing.assert_allclose(s["integer_inference_energy_ratio"], s["dense_inference_energy"] / energy, rtol=1e-5)
    np.testing.assert_allclose(s["integer_inference_energy_ratio_vs_int8"], s["dense_int8_inference_energy"] / energy,
                               rtol=1e-5)
    rows = analysis.layer_rows(result)
    np.testing.assert_allclose([row["integer_inference_energy"] for row in rows], sum(parts.values()), rtol=1e-5)
    line = (f"integer-only SD inference per image: {s['integer_int8_macs']:,} int8 MACs, "
            f"{s['integer_rebuild_shifts']:,} rebuild shifts")
    assert line in analysis.format_text(result) and line in analysis.format_markdown(result)
    assert f"dense / integer {s['integer_inference_energy_ratio']:.2f}x" in analysis.format_text(result)
    assert json.loads(analysis.to_json(result))["summary"]["integer_rebuild_adds"] == s["integer_rebuild_adds"]
    assert "integer_inference_energy" in analysis.to_csv(result).splitlines()[0]


def test_a_table_that_cannot_price_the_integer_path_is_named_in_one_line(network):
    eyeriss = hardware.hardware("eyeriss", weight_bits=16, activation_bits=16)
    result = analysis.analyze(network, "resnet20", unit="MAC", dense_hardware=eyeriss, sd_hardware=eyeriss,
                              integer=integer.integer_view(network, "eyeriss"))
    s = json.loads(analysis.to_json(result))["summary"]
    assert s["integer_inference_energy"] is None and s["integer_inference_energy_ratio"] is None
    assert s["integer_int8_macs"] == sum(layer.effective_macs for layer in network.layers)
    unpriced = [line for line in analysis.format_text(result).splitlines() if "not priced" in line]
    assert len(unpriced) == 1 and unpriced[0].endswith(
        "energy not priced: table 'eyeriss' has no mult_int8, add_int8, add_int32, mult_int32")
    assert analysis.to_csv(result)
