"""Unit-energy tables by name: Horowitz 45 nm, Eyeriss-relative, or a user JSON file (docs/method.md 1.5).

A table maps entry names to `Entry(value, source, word_bits)`. Memory entries (`dram`, `buffer`,
`register`) are the energy of one access of a `word_bits`-bit word; arithmetic entries are named
`<op>_<dtype>` with op in {mult, add, mac} and dtype in {int8, int16, int32, fp16, fp32}, the energy
of one operation. Units are the table's (`unit`: "pJ" or "MAC" for energies relative to one MAC).

A user table is a JSON object {"name": ..., "unit": ..., "entries": {key: {"value": v,
"source": "...", "word_bits": 32}}}; every entry must say where its value comes from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

MEMORY_LEVELS = ("dram", "buffer", "register")
OPS = ("mult", "add", "mac")
DTYPES = ("int8", "int16", "int32", "fp16", "fp32")

_HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm, 0.9 V"
_EYERISS = "Chen et al., 'Eyeriss', ISCA 2016 / JSSC 2017, 65 nm, normalized to one 16-bit MAC"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One unit energy: its value, where it comes from, and the word width of a memory access."""

    value: float
    source: str
    word_bits: int | None = None


@dataclasses.dataclass(frozen=True)
class EnergyTable:
    """A named set of unit energies; `get` raises a ValueError naming a missing entry."""

    name: str
    unit: str
    entries: Mapping[str, Entry]

    def get(self, key: str) -> Entry:
        """The entry `key`, or a ValueError listing the table's entries."""
        if key not in self.entries:
            raise ValueError(
                f"energy table '{self.name}' has no entry '{key}'; it has {sorted(self.entries)}. "
                "Pick bit widths the table covers or pass a user table (JSON) that defines it"
            )
        return self.entries[key]

    def per_bit(self, level: str) -> float:
        """Energy of moving one bit at memory `level`."""
        entry = self.get(level)
        return entry.value / entry.word_bits

    def operation(self, op: str, dtype: str) -> float:
        """Energy of one `op` on `dtype` operands; a MAC is mult + add when the table has no `mac_` entry."""
        if op == "mac" and f"mac_{dtype}" not in self.entries:
            return self.get(f"mult_{dtype}").value + self.get(f"add_{dtype}").value
        return self.get(f"{op}_{dtype}").value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the user-table format)."""
        return dict(name=self.name, unit=self.unit,
                    entries={key: dataclasses.asdict(entry) for key, entry in self.entries.items()})


def _horowitz() -> EnergyTable:
    ops = {
        "add_int8": 0.03, "add_int16": 0.05, "add_int32": 0.1, "mult_int8": 0.2, "mult_int32": 3.1,
        "add_fp16": 0.4, "mult_fp16": 1.1, "add_fp32": 0.9, "mult_fp32": 3.7,
    }
    entries = {key: Entry(value, _HOROWITZ) for key, value in ops.items()}
    entries["dram"] = Entry(640.0, _HOROWITZ + ": DRAM, per 32-bit word (1 : 6400 of Han et al. 2016)", 32)
    entries["buffer"] = Entry(5.0, _HOROWITZ + ": 8 KB SRAM, per 32-bit word", 32)
    entries["register"] = Entry(
        5.0 / 6.0, "derived: Eyeriss register-file / global-buffer ratio 1 : 6 times Horowitz 8 KB SRAM", 32)
    return EnergyTable("horowitz45nm", "pJ", entries)


def _eyeriss() -> EnergyTable:
    entries = {
        "dram": Entry(200.0, _EYERISS + ": DRAM access", 16),
        "buffer": Entry(6.0, _EYERISS + ": global buffer access", 16),
        "register": Entry(1.0, _EYERISS + ": register-file access", 16),
        "mac_int16": Entry(1.0, _EYERISS + ": one MAC (the unit)", None),
        "add_int16": Entry(1.0, "assumption: Eyeriss charges every ALU operation as one MAC; an add is "
                                "charged the same (an upper bound)", None),
    }
    return EnergyTable("eyeriss", "MAC", entries)


_TABLES = {"horowitz45nm": _horowitz, "eyeriss": _eyeriss}


def names() -> list[str]:
    """The built-in table names."""
    return sorted(_TABLES)


def get(name: str) -> EnergyTable:
    """A built-in table by name, or a user table when `name` is the path of a JSON file."""
    if name in _TABLES:
        return _TABLES[name]()
    if name.endswith(".json") or os.path.exists(name):
        return load(name)
    raise ValueError(f"unknown energy table {name!r}; pass one of {names()} or the path of a JSON table")


def load(path: str) -> EnergyTable:
    """Read and check a user table from a JSON file (format in the module docstring)."""
    try:
        with open(path) as stream:
            data = json.load(stream)
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"energy table {path}: cannot read it as JSON ({error}); fix the file") from None
    return from_dict(data, origin=path)


def from_dict(data: Mapping[str, Any], origin: str = "user table") -> EnergyTable:
    """An `EnergyTable` from its dict form, checking every entry."""
    if not isinstance(data, Mapping) or not isinstance(data.get("entries"), Mapping):
        raise ValueError(f"{origin}: expected an object with 'entries' (and 'name', 'unit')")
    entries = {}
    for key, raw in data["entries"].items():
        where = f"{origin}: entry '{key}'"
        op, _, dtype = key.partition("_")
        if key not in MEMORY_LEVELS and not (op in OPS and dtype in DTYPES):
            raise ValueError(f"{where} is not a known entry; use one of {MEMORY_LEVELS} or "
                             f"<op>_<dtype> with op in {OPS} and dtype in {DTYPES}")
        if not isinstance(raw, Mapping) or not isinstance(raw.get("source"), str) or not raw["source"]:
            raise ValueError(f"{where}: give {{'value': ..., 'source': '...'}}; every value needs its source")
        value = raw.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: value {value!r} must be a finite number >= 0")
        word_bits = raw.get("word_bits")
        if key in MEMORY_LEVELS and (not isinstance(word_bits, int) or word_bits < 1):
            raise ValueError(f"{where}: memory entries need 'word_bits' (a positive int), got {word_bits!r}")
        entries[key] = Entry(float(value), raw["source"], word_bits if key in MEMORY_LEVELS else None)
    return EnergyTable(str(data.get("name", origin)), str(data.get("unit", "pJ")), entries)
