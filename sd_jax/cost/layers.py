"""Layer extraction by tracing: every conv / dense / SD layer a Flax model calls, with its shapes.

`extract_layers` runs `model.init` under `jax.eval_shape` (nothing is computed or allocated) inside
`nn.intercept_methods`, catching each call of nn.Conv, nn.Dense, SDConv and SDDense: kernel shape,
input and output shapes, strides, dilation, groups and two MAC counts. `macs` is the count FLOP
counters and published model tables give (output positions x kernel volume x input channels per
group x output channels, taps on zero padding included: ResNet-20 on CIFAR 40.55 M, ImageNet
ResNet-50 4.09 G); `effective_macs` leaves out the taps that fall on zero padding, as XLA's cost
analysis does, and is the count the energy model charges (`sd_jax.cost.energy`). SD statistics come from
concrete variables: an SD layer's `sd_coeff` / `sd_mask` (quantized as the layer quantizes them),
or a `NetworkDecomposition` of a dense model's parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from sd_jax.core import pow2, report
from sd_jax.core.decompose import Decomposition
from sd_jax.core.network import NetworkDecomposition
from sd_jax.nn import SD_COEFF, SD_MASK, SDConv, SDDense

LAYER_TYPES = (nn.Conv, nn.Dense, SDConv, SDDense)


@dataclasses.dataclass(frozen=True)
class SDStats:
    """What an SD kernel costs: non-zeros of C, entries of C and B, distinct magnitudes, block width k."""

    nonzeros: int
    coeff_entries: int
    basis_entries: int
    distinct_magnitudes: int
    k: int

    @property
    def code_bits(self) -> int:
        """Bits of one non-zero coefficient (exponent code and sign)."""
        return report.coefficient_bits(self.distinct_magnitudes)

    @property
    def storage_bits(self) -> int:
        """The reference storage count (docs/method.md 1.5), B at 32 bits."""
        return report.storage_bits(self.nonzeros, self.distinct_magnitudes, self.coeff_entries, self.basis_entries)

    @property
    def density(self) -> float:
        """Non-zeros over the entries of C."""
        return self.nonzeros / self.coeff_entries


def sd_stats(coeff: Any, basis_shape: Sequence[int]) -> SDStats:
    """Statistics of an SD kernel from its effective C (n, m, k) (0 or ±2^e) and B's shape."""
    coeff = np.asarray(coeff)
    nonzero = coeff[coeff != 0]
    distinct = np.unique(np.frexp(nonzero)[1]).size  # one exponent per magnitude 2^e
    return SDStats(int(nonzero.size), int(coeff.size), math.prod(basis_shape), int(distinct), int(coeff.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer call, per example: shapes without the batch axis, MACs of one example.

    `macs` counts every (output position, kernel tap) pair as FLOP counters do; `effective_macs`
    only those whose input is not zero padding (equal for dense layers and unpadded convolutions).
    """

    name: str
    kind: str  # "conv", "depthwise" or "dense"
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    macs: int
    effective_macs: int
    sd_layer: bool  # built as SDConv / SDDense
    sd: SDStats | None  # statistics of its SD form, when known

    @property
    def weights(self) -> int:
        return math.prod(self.kernel_shape)

    @property
    def inputs(self) -> int:
        return math.prod(self.input_shape)

    @property
    def outputs(self) -> int:
        return math.prod(self.output_shape)


@dataclasses.dataclass(frozen=True)
class Network:
    """The analyzable layers of a model and its other parameters (biases, norms), counted apart."""

    layers: tuple[Layer, ...]
    other_params: int


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


def _unpadded_taps(size_in: int, size_out: int, taps: int, stride: int, dilation: int, pad_low: int) -> int:
    """Number of (output position, kernel tap) pairs along one axis whose input is not padding."""
    index = np.arange(size_out)[:, None] * stride + np.arange(taps)[None, :] * dilation - pad_low
    return int(np.count_nonzero((index >= 0) & (index < size_in)))


def _conv_record(module: nn.Module, x: Any, y: Any) -> dict[str, Any]:
    kernel_size = _tuple(module.kernel_size, 1 if isinstance(module.kernel_size, int) else len(module.kernel_size))
    rank = len(kernel_size)
    strides, dilation = _tuple(module.strides, rank), _tuple(module.kernel_dilation, rank)
    groups = int(module.feature_group_count)
    cin = x.shape[-1]
    spatial_in, spatial_out = x.shape[-rank - 1:-1], y.shape[-rank - 1:-1]
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    padding = canonicalize_padding(module.padding, rank)
    if padding in ("SAME", "VALID"):
        padding = jax.lax.padtype_to_pads(spatial_in, dilated, strides, padding)
    elif padding == "CAUSAL":  # zeros before the input, as flax pads it
        padding = [(size - 1, 0) for size in dilated]
    elif isinstance(padding, str):  # CIRCULAR pads with real values: every tap counts
        padding = [(0, 0)] * rank
        spatial_in = tuple(o * s + size - 1 for o, s, size in zip(spatial_out, strides, dilated))
    unpadded_taps = math.prod(_unpadded_taps(i, o, k, s, d, p[0]) for i, o, k, s, d, p in
                              zip(spatial_in, spatial_out, kernel_size, strides, dilation, padding))
    batch = math.prod(x.shape[:-rank - 1])
    kernel_shape = (*kernel_size, cin // groups, int(module.features))
    depthwise = kernel_shape[-2] == 1 and groups == module.features and groups > 1
    kind = getattr(module, "kind", None) or ("depthwise" if depthwise else "conv")
    per_tap = batch * (cin // groups) * int(module.features)
    return dict(kind=kind, kernel_shape=kernel_shape, strides=strides, dilation=dilation, groups=groups,
                macs=per_tap * math.prod(spatial_out) * math.prod(kernel_size), effective_macs=per_tap * unpadded_taps)


def _dense_record(module: nn.Module, x: Any) -> dict[str, Any]:
    din, dout = x.shape[-1], int(module.features)
    macs = math.prod(x.shape[:-1]) * din * dout
    return dict(kind="dense", kernel_shape=(din, dout), strides=(), dilation=(), groups=1, macs=macs,
                effective_macs=macs)


def _lookup(tree: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


_quantize = jax.jit(pow2.quantize_pow2)


def _sd_layer_stats(module: nn.Module, path: tuple[str, ...], variables: Mapping[str, Any]) -> SDStats:
    coeff, mask = _lookup(variables, (SD_COEFF, *path, "coeff")), _lookup(variables, (SD_MASK, *path, "mask"))
    if coeff is None or mask is None:
        raise ValueError(f"layer '{'/'.join(path)}' is an SD layer but the variables hold no "
                         f"{SD_COEFF}/{SD_MASK} for it; pass the SD model's variables")
    if module.mode == "latent":  # the layer quantizes C in its forward pass; count what it uses
        coeff = _quantize(coeff, float(module.threshold), float(module.max_coeff))
    coeff = np.where(np.asarray(mask), np.asarray(coeff), 0.0)
    return sd_stats(coeff, (coeff.shape[0], coeff.shape[-1], coeff.shape[-1]))


def extract_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    variables: Mapping[str, Any] | None = None,
    decomposition: NetworkDecomposition | None = None,
    **call_kwargs: Any,
) -> Network:
    """The conv / dense / SD layers `model` calls on an input of `input_shape` (batch first).

    `call_kwargs` go to the model call (zoo models: train=False). SD statistics: SD layers read
    `variables`; other layers use `decomposition.tree` (a kernel replaced by a `Decomposition`).
    """
    records: list[dict[str, Any]] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, LAYER_TYPES):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        dense = isinstance(module, (nn.Dense, SDDense))
        record = _dense_record(module, x) if dense else _conv_record(module, x, y)
        records.append(dict(record, module=module, path=tuple(module.path), x=x.shape, y=y.shape))
        return y

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **call_kwargs), x)
    if not records:
        raise ValueError(f"model {type(model).__name__} calls no nn.Conv, nn.Dense, SDConv or SDDense layer; "
                         "nothing to analyze (build its layers from these, e.g. through the zoo factories)")
    batch = int(input_shape[0])
    layers, seen = [], {}
    for record in records:
        path, module = record["path"], record["module"]
        name = "/".join(path)
        seen[name] = seen.get(name, 0) + 1
        sd_layer = isinstance(module, (SDConv, SDDense))
        stats = None
        if sd_layer and variables is not None:
            stats = _sd_layer_stats(module, path, variables)
        elif decomposition is not None:
            leaf = _lookup(decomposition.tree, (*path, "kernel"))
            if isinstance(leaf, Decomposition):
                stats = sd_stats(leaf.coeff, leaf.basis.shape)
        layers.append(Layer(
            name=name if seen[name] == 1 else f"{name}#{seen[name]}", kind=record["kind"],
            kernel_shape=record["kernel_shape"], input_shape=tuple(record["x"][1:]),
            output_shape=tuple(record["y"][1:]), strides=record["strides"], dilation=record["dilation"],
            groups=record["groups"], macs=record["macs"] // batch,
            effective_macs=record["effective_macs"] // batch, sd_layer=sd_layer, sd=stats,
        ))
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes.get("params", {})))
    dense_kernels = {r["path"]: math.prod(r["kernel_shape"]) for r in records
                     if not isinstance(r["module"], (SDConv, SDDense))}
    return Network(layers=tuple(layers), other_params=total - sum(dense_kernels.values()))
