"""Inference energy as the cost of a per-layer SD setting, for an energy target (`sd.target_energy_ratio`).

`EnergyPricing` is a `sd_jax.nn.allocate.Pricing`: each candidate of a layer becomes that layer's SD
statistics in the analyzer's network, priced by `energy.energy` on the SD accelerator (weight traffic
at the candidate's storage, rebuild at its non-zeros); the dense total is the dense float32 network's
inference energy and the layers no candidate changes count as the analyzer's SD view counts them.
Ratios then match `analysis.summary`'s `1 / inference_energy_ratio`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sd_jax.cost import energy as energy_lib
from sd_jax.cost.comparison import views_hardware
from sd_jax.cost.hardware import Hardware
from sd_jax.cost.layers import Layer, Network, SDStats
from sd_jax.nn.allocate import CandidateStats


def _inference_energy(layers: Sequence[Layer], hw: Hardware, *, sd: bool) -> np.ndarray:
    """Inference energy per example of each of `layers` on `hw` (at its batch)."""
    counts = energy_lib.layer_counts(Network(tuple(layers), 0), sd=sd)
    parts = energy_lib.energy(counts, hw)["inference"]
    return np.asarray(sum(np.asarray(value, np.float64) for value in parts.values()))


@dataclasses.dataclass(frozen=True)
class EnergyPricing:
    """Inference energy per example of `network` (its dense layers) on the dense and SD accelerators, each
    at the inference batch."""

    network: Network
    dense_hardware: Hardware
    sd_hardware: Hardware

    def _calls(self, layer: str) -> list[Layer]:
        """Every call of `layer` (a layer called twice appears as 'name' and 'name#2')."""
        calls = [call for call in self.network.layers if call.name.partition("#")[0] == layer]
        if not calls:
            raise ValueError(f"layer {layer!r} of the parameters is not called by the model; pass the config "
                             "(model.name, input) of the model the parameters belong to")
        return calls

    def dense_total(self, sizes: Mapping[str, int], dense_params: int) -> float:
        return float(_inference_energy(self.network.layers, self.dense_hardware, sd=False).sum())

    def fixed(self, sizes: Mapping[str, int], dense_params: int) -> float:
        for layer in sizes:
            self._calls(layer)
        others = [call for call in self.network.layers if call.name.partition("#")[0] not in sizes]
        return float(_inference_energy(others, self.sd_hardware, sd=False).sum()) if others else 0.0

    def costs(self, layer: str, candidates: Sequence[CandidateStats]) -> np.ndarray:
        calls = self._calls(layer)
        priced = [dataclasses.replace(call, sd=SDStats(round(c.nonzeros), c.coeff_entries, c.basis_entries,
                                                       c.distinct_exponents, c.k))
                  for c in candidates for call in calls]
        return _inference_energy(priced, self.sd_hardware, sd=True).reshape(len(candidates), len(calls)).sum(axis=1)


def energy_pricing(network: Network, options: Mapping[str, Any]) -> EnergyPricing:
    """The pricing of `network` (dense layers, `layers.extract_layers`) with a config's `cost` options
    (`comparison.cost_options`): dense at `dense_bits`, SD at `sd_weight_bits`/`sd_activation_bits`."""
    batch = np.float32(options["inference_batch"])
    hardware = {view: dataclasses.replace(hw, batch=batch) for view, hw in views_hardware(options).items()}
    return EnergyPricing(network, hardware["dense"], hardware["sd"])
