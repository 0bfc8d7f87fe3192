"""Tests for sd_jax/cost/tables.py and sd_jax/cost/hardware.py."""
import json

import jax.numpy as jnp
import pytest

from sd_jax.cost import hardware, tables


def test_builtin_tables_carry_the_design_values_and_sources():
    horowitz = tables.get("horowitz45nm")
    assert horowitz.get("mult_int32").value == 3.1 and horowitz.per_bit("dram") == 640 / 32
    assert horowitz.operation("mac", "int8") == pytest.approx(0.2 + 0.03)
    eyeriss = tables.get("eyeriss")
    assert eyeriss.get("dram").value == 200 and eyeriss.operation("mac", "int16") == 1
    assert all(entry.source for table in (horowitz, eyeriss) for entry in table.entries.values())


def test_user_table_round_trips_through_json(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(tables.get("horowitz45nm").to_dict()))
    assert tables.get(str(path)).entries == tables.get("horowitz45nm").entries


@pytest.mark.parametrize("entries, message", [
    ({"dram": {"value": 1.0, "source": "x"}}, "word_bits"),
    ({"dram": {"value": 1.0, "word_bits": 32}}, "source"),
    ({"flux": {"value": 1.0, "source": "x"}}, "not a known entry"),
    ({"add_int8": {"value": -1.0, "source": "x"}}, ">= 0"),
])
def test_bad_user_table_raises(entries, message):
    with pytest.raises(ValueError, match=message):
        tables.from_dict({"entries": entries})


def test_unknown_table_and_missing_entry_raise():
    with pytest.raises(ValueError, match="unknown energy table"):
        tables.get("nowhere")
    with pytest.raises(ValueError, match="has no entry 'mult_int8'"):
        hardware.hardware("eyeriss", weight_bits=8, activation_bits=8)


def test_hardware_resolves_widths_to_unit_energies():
    hw = hardware.hardware(weight_bits=8, activation_bits=8)
    assert float(hw.mac) == pytest.approx(0.2 + 0.1)  # int8 mult, int32 accumulate
    assert float(hw.add) == pytest.approx(0.03) and float(hw.buffer_bits) == 108 * 8192


@pytest.mark.parametrize("field", ["buffer_kib", "batch", "weight_bits", "pe_count"])
def test_negative_size_raises(field):
    with pytest.raises(ValueError, match=field):
        hardware.hardware(**{field: -1})


def test_sweep_and_stack_build_leading_axes():
    base = hardware.hardware()
    swept = hardware.sweep(base, buffer_bits=jnp.arange(1.0, 6.0))
    assert swept.buffer_bits.shape == (5,) and swept.mac.shape == (5,)
    assert hardware.stack([base, base]).dram_per_bit.shape == (2,)
    with pytest.raises(ValueError, match="unknown hardware field"):
        hardware.sweep(base, flux=jnp.ones(3))
    with pytest.raises(ValueError, match="negative"):
        hardware.sweep(base, buffer_bits=-jnp.ones(3))
