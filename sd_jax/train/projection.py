"""A dense model's kernels projected onto SD form: the authors' inference-only rule (docs/method.md 1.6).

SmartDeal-Inference/main.py trains a dense network and, after every epoch, replaces each weight the
method covers, in the model and in its SWA average, by the reconstruction C·B of its decomposition;
training goes on from the projected weights, and the accuracy it reports is theirs. `project` is one
such projection of a `params` tree, with the layers and options of an `SDRules` (the same rules that
would build the SD model), through the one batched decomposition (`sd_jax.nn.convert.to_sd`). It
returns the decomposition too, so the storage of the projected weights is counted on the C and B
they are made of (`sd_jax.nn.report.model_report(decomposition.tree)`).
"""

from __future__ import annotations

from typing import Any

from sd_jax.core.network import NetworkDecomposition
from sd_jax.nn import convert
from sd_jax.nn.rules import SDRules


def project(params: Any, rules: SDRules) -> tuple[Any, NetworkDecomposition]:
    """(`params` with every kernel `rules` select replaced by C·B of its decomposition, the decomposition).

    Other leaves (biases, batch-norm parameters, kernels the rules leave dense) come back as they are.
    """
    _, decomposition = convert.to_sd({"params": params}, rules)
    return decomposition.reconstruct(), decomposition
