"""Integer-only SD inference in the manner of Jacob et al. 2018 ("Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR), with the SD rebuild done the way an
accelerator would: shifts and adds.

`quantize(model, variables, calibration_images)` turns an SD zoo model (eval mode) into an
`IntegerModel` whose `apply(images)` runs on integers from the input quantization to the logits:

- Batch norm is folded into the preceding layer: its scale into B of that output channel's blocks
  (blocks are ordered output-major, docs/method.md 1.1), its shift into an int32 bias.
- Activations are uint8 with a zero point, from the [min, max] of the calibration batch (widened to
  hold 0); after a ReLU the zero point is 0 and the clamp at it is the ReLU.
- B is int8 with one scale per output channel. C is stored as codes: a sign in {-1, 0, 1} and a shift
  e - e_min (C = ±2^e, e_min the layer's smallest exponent). The kernel is rebuilt on every call by
  `shift_add_rebuild`: W_int[n, m, j] = sum over k of ±(B_int[n, k, j] << shift[n, m, k]), int32.
- The rebuilt W_int is requantized to int8 per output channel (`requantize`), so every MAC is
  int8 x int8 into an int32 accumulator (`accumulator_bound` proves it cannot overflow).
- The uint8 activation enters the MAC as q - 128 (int8); the zero point's correction
  (128 - z) * sum(w) is folded into the bias. Convolutions pad with the zero point (real 0).
- Requantization multiplies by a fixed-point multiplier, an int32 m0 in [2^30, 2^31) and a right
  shift, rounding half away from zero; the 64-bit product is formed from 32-bit words
  (`multiply_by_quantized_multiplier`), as a 32-bit integer unit would.
- Residual adds rescale both operands to the output's scale and add; average pooling sums integers
  and folds 1 / (H W) into its multiplier. Only the logits' int32 accumulators are turned back into
  floats (`dequantize`), times scale_in * scale_w per class.

Supported: the CIFAR ResNets with option-A shortcuts (`SUPPORTED`), whose SD or dense conv and dense
layers may be mixed, and the MLP. `IntegerModel.params` is a plain dict of integer arrays (and the two
float32 boundary scales); `save` writes them with the graph (JSON) to an .npz that `load` reads back
without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import io as sd_io
from sd_jax.core import blocking, pow2
from sd_jax.models.common import BN_EPSILON
from sd_jax.models.resnet_cifar import WIDTHS, CifarResNet
from sd_jax.models.small import MLP
from sd_jax.nn.layers import SD_BASIS, SD_COEFF, SD_MASK, SDLayout, record_layouts

Array = jax.Array

SUPPORTED = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "mlp")
ACTIVATION_MAX = 255  # uint8 activations
WEIGHT_MAX = 127  # int8 weights and B, symmetric (zero point 0)
INT8_OFFSET = 128  # uint8 q enters the MAC as q - 128
INT32_MAX = 2**31 - 1


# ---- fixed-point numerics (pure functions) ----

def quantize_multiplier(real: Any) -> tuple[np.ndarray, np.ndarray]:
    """(m0, shift) int32 with real = m0 * 2^-shift, m0 in [2^30, 2^31); `real` > 0, shift in [1, 62]."""
    real = np.asarray(real, np.float64)
    if np.any(~np.isfinite(real)) or np.any(real <= 0):
        raise ValueError(f"quantize_multiplier: multipliers must be finite and > 0, got {real[~(real > 0)][:3]}")
    mantissa, exponent = np.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = np.round(mantissa * 2.0**31).astype(np.int64)
    carry = m0 == 2**31
    m0, exponent = np.where(carry, 2**30, m0), np.where(carry, exponent + 1, exponent)
    shift = 31 - exponent
    if np.any(shift < 1) or np.any(shift > 62):
        raise ValueError(f"quantize_multiplier: multiplier {real.max():.3g} or {real.min():.3g} is outside "
                         "[2^-32, 2^30); the calibration ranges are degenerate, pass more varied calibration images")
    return m0.astype(np.int32), shift.astype(np.int32)


def multiply_by_quantized_multiplier(x: Array, m0: Array, shift: Array) -> Array:
    """round(x * m0 / 2^shift) for int32 x, halves away from zero, saturated to int32; 32-bit ops only.

    The product |x| * m0 (up to 62 bits) is held as two uint32 words built from 16-bit halves.
    """
    u32 = jnp.uint32
    magnitude = jnp.abs(x).astype(u32)  # |-2^31| wraps to 2^31, which uint32 holds
    m = jnp.asarray(m0).astype(u32)
    shift = jnp.broadcast_to(jnp.asarray(shift).astype(u32), jnp.shape(x))
    a_hi, a_lo = magnitude >> 16, magnitude & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    cross1, cross2 = a_hi * m_lo, a_lo * m_hi
    low, high = a_lo * m_lo, a_hi * m_hi
    for cross in (cross1, cross2):
        total = low + (cross << 16)
        high = high + (cross >> 16) + (total < low).astype(u32)
        low = total
    one = u32(1)
    round_low = jnp.where(shift <= 32, one << jnp.minimum(shift - 1, 31), u32(0))
    round_high = jnp.where(shift > 32, one << jnp.clip(shift - 33, 0, 31), u32(0))
    total = low + round_low
    high = high + round_high + (total < low).astype(u32)
    low = total
    below = (low >> jnp.minimum(shift, 31)) | (high << jnp.clip(32 - shift, 1, 31))
    result = jnp.where(shift < 32, below, high >> jnp.clip(shift - 32, 0, 31))
    overflow = jnp.where(shift < 32, (high >> jnp.minimum(shift, 31)) > 0, False)
    result = jnp.where(overflow | (result > INT32_MAX), u32(INT32_MAX), result).astype(jnp.int32)
    return jnp.where(x < 0, -result, result)


def shift_add_rebuild(sign: Array, shift: Array, basis: Array) -> Array:
    """W_int (n, m, j) int32 = sum_k ±(B[n, k, j] << shift[n, m, k]) where sign[n, m, k] != 0.

    sign, shift: (n, m, k) codes of C = sign * 2^(shift + e_min); basis: (n, k, j) int8.
    """
    shifted = jnp.left_shift(basis.astype(jnp.int32)[:, None, :, :], shift.astype(jnp.int32)[..., None])
    sign = sign[..., None]
    terms = jnp.where(sign > 0, shifted, jnp.where(sign < 0, -shifted, 0))  # (n, m, k, j)
    return jnp.sum(terms, axis=2, dtype=jnp.int32)


def requantize(acc: Array, m0: Array, shift: Array, zero_point: Array | int, low: Array | int, high: int) -> Array:
    """clip(zero_point + round(acc * m0 / 2^shift), low, high): an int32 accumulator to a narrow integer
    (clipped before the zero point is added, so a saturated product cannot wrap)."""
    return jnp.clip(multiply_by_quantized_multiplier(acc, m0, shift), low - zero_point, high - zero_point) + zero_point


def accumulator_bound(reduction: int, bias: Any) -> int:
    """The largest |int32 accumulator| of a layer: |sum of (q - 128) w| <= 128 * 127 * reduction, plus
    the bias (q - 128 in [-128, 127], |w| <= 127). It fits int32 for reductions up to 132,000."""
    return INT8_OFFSET * WEIGHT_MAX * reduction + int(np.max(np.abs(np.asarray(bias, np.int64)), initial=0))


# ---- the integer graph ----

@dataclasses.dataclass(frozen=True)
class LayerShape:
    """Static form of one integer layer: its blocking (None: an int8 kernel stored as is), the kernel
    shape, strides and padding (convolutions)."""

    kernel_shape: tuple[int, ...]
    spec: blocking.BlockSpec | None
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))


@flax.struct.dataclass
class IntegerModel:
    """An integer-only model: `params` (integer arrays per layer; `input` and `logits` hold the two
    float32 boundary scales) and its static graph (`family`, `depth`, `layers`)."""

    params: dict[str, dict[str, Array]]
    family: str = flax.struct.field(pytree_node=False)
    depth: int = flax.struct.field(pytree_node=False)
    layers: tuple[tuple[str, LayerShape], ...] = flax.struct.field(pytree_node=False)

    def quantize_input(self, images: Array) -> Array:
        """Float images to uint8 with the calibrated input scale and zero point."""
        scale, zero_point = self.params["input"]["scale"], self.params["input"]["zero_point"]
        q = jnp.round(jnp.asarray(images, jnp.float32) / scale) + zero_point.astype(jnp.float32)
        return jnp.clip(q, 0, ACTIVATION_MAX).astype(jnp.uint8)

    def integer_logits(self, q: Array) -> Array:
        """The logits' int32 accumulators of uint8 images `q`: integer arithmetic only."""
        layers = dict(self.layers)
        if self.family == "mlp":
            return _mlp_forward(self.params, layers, q)
        return _resnet_forward(self.params, layers, self.depth, q)

    def dequantize(self, acc: Array) -> Array:
        """Float32 logits of the int32 accumulators (scale_in * scale_w per class)."""
        return acc.astype(jnp.float32) * self.params["logits"]["scale"]

    def apply(self, images: Array) -> Array:
        """Float32 logits of NHWC float images, computed in integers between the two ends; jittable."""
        return self.dequantize(self.integer_logits(self.quantize_input(images)))


def _kernel(p: Mapping[str, Array], shape: LayerShape) -> Array:
    """The int8 kernel of a layer: rebuilt from C's codes and B_int8 by shifts and adds, then requantized
    per output channel; or the stored int8 kernel of a layer kept dense."""
    if shape.spec is None:
        return p["kernel"]
    spec = shape.spec
    rebuilt = shift_add_rebuild(p["sign"], p["shift"], p["basis"])  # (n, m, k) int32
    per_block = lambda v: jnp.repeat(v, spec.blocks_per_output)[:, None, None]  # output-major blocks
    w = requantize(rebuilt, per_block(p["weight_m0"]), per_block(p["weight_shift"]), 0, -WEIGHT_MAX, WEIGHT_MAX)
    return blocking.from_blocks(w.astype(jnp.int8), spec)


# Compiled once per shape when quantizing; op by op, each primitive would compile on its own.
_rebuild = jax.jit(shift_add_rebuild)
_integer_kernel = jax.jit(_kernel, static_argnums=1)


def _accumulate(p: Mapping[str, Array], shape: LayerShape, q: Array) -> Array:
    """int32 accumulators of a layer on uint8 `q`: sum of (q - 128) w_int8 plus the folded bias."""
    kernel = _kernel(p, shape)
    x = (q.astype(jnp.int16) - INT8_OFFSET).astype(jnp.int8)
    if len(shape.kernel_shape) == 2:
        acc = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    else:
        pad_value = (p["input_zero_point"] - INT8_OFFSET).astype(jnp.int8)  # the real 0, as q - 128
        x = jnp.pad(x, ((0, 0), *shape.padding, (0, 0)), constant_values=pad_value)
        acc = jax.lax.conv_general_dilated(x, kernel, shape.strides, "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           preferred_element_type=jnp.int32)
    return acc + p["bias"]


def _layer(p: Mapping[str, Array], shape: LayerShape, q: Array) -> Array:
    """A layer followed by requantization to uint8 (a ReLU when the output zero point is the clamp)."""
    acc = _accumulate(p, shape, q)
    return requantize(acc, p["m0"], p["shift_out"], p["zero_point"], p["low"], ACTIVATION_MAX).astype(jnp.uint8)


def _option_a(q: Array, features: int, stride: int, zero_point: Array) -> Array:
    """The option-A shortcut on uint8: subsample, pad channels with the zero point (the real 0)."""
    q = q[:, ::stride, ::stride, :]
    extra = features - q.shape[-1]
    return jnp.pad(q, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)),
                   constant_values=zero_point.astype(q.dtype))


def _resnet_forward(params: Mapping[str, Any], layers: Mapping[str, LayerShape], depth: int, q: Array) -> Array:
    x = _layer(params["stem/conv"], layers["stem/conv"], q)
    for name, width, stride in _resnet_blocks(depth):
        y = _layer(params[f"{name}/conv1"], layers[f"{name}/conv1"], x)
        acc = _accumulate(params[f"{name}/conv2"], layers[f"{name}/conv2"], y)
        add = params[f"{name}/add"]
        residual = _option_a(x, width, stride, add["residual_zero_point"]).astype(jnp.int32)
        residual = multiply_by_quantized_multiplier(residual - add["residual_zero_point"], add["residual_m0"],
                                                    add["residual_shift"])
        total = multiply_by_quantized_multiplier(acc, add["m0"], add["shift_out"]) + residual + add["zero_point"]
        x = jnp.clip(total, add["low"], ACTIVATION_MAX).astype(jnp.uint8)
    return _pool_and_head(params, layers, x)


def _pool_and_head(params: Mapping[str, Any], layers: Mapping[str, LayerShape], x: Array) -> Array:
    pool = params["head/pool"]
    total = jnp.sum(x.astype(jnp.int32) - pool["input_zero_point"], axis=(1, 2))  # (batch, channels)
    pooled = requantize(total, pool["m0"], pool["shift_out"], pool["zero_point"], 0, ACTIVATION_MAX)
    return _accumulate(params["head/dense"], layers["head/dense"], pooled.astype(jnp.uint8))


def _mlp_forward(params: Mapping[str, Any], layers: Mapping[str, LayerShape], q: Array) -> Array:
    x = q.reshape(q.shape[0], -1)
    for name in (name for name in layers if name.startswith("hidden")):  # in build order
        x = _layer(params[name], layers[name], x)
    return _accumulate(params["head/dense"], layers["head/dense"], x)


def _resnet_blocks(depth: int) -> list[tuple[str, int, int]]:
    """(block name, width, stride) of a CIFAR ResNet of `depth`, in order."""
    per_stage = (depth - 2) // 6
    return [(f"stage{s}_block{b}", width, 2 if (s > 1 and b == 0) else 1)
            for s, width in enumerate(WIDTHS, start=1) for b in range(per_stage)]


GRAPH_KEY = "graph"  # the .npz entry holding the static graph as UTF-8 JSON


def save(model: IntegerModel, path: str | os.PathLike) -> None:
    """Write `model` to the .npz `path`: each array as '<layer>/<name>', the graph as JSON text."""
    graph = dict(family=model.family, depth=model.depth,
                 layers=[[name, dataclasses.asdict(shape)] for name, shape in model.layers])
    arrays = {f"{layer}/{key}": np.asarray(value) for layer, leaves in model.params.items()
              for key, value in leaves.items()}
    sd_io.atomic_write(path, lambda stream: np.savez(
        stream, **arrays, **{GRAPH_KEY: np.frombuffer(json.dumps(graph).encode(), np.uint8)}))


def _layer_shape(fields: Mapping[str, Any]) -> LayerShape:
    spec = fields["spec"]
    if spec is not None:
        spec = blocking.BlockSpec(**{key: tuple(v) if isinstance(v, list) else v for key, v in spec.items()})
    return LayerShape(tuple(fields["kernel_shape"]), spec, tuple(fields["strides"]),
                      tuple(tuple(pair) for pair in fields["padding"]))


def load(path: str | os.PathLike) -> IntegerModel:
    """The integer model `save` wrote to `path`; ValueError when the file is not one."""
    with np.load(path, allow_pickle=False) as stored:
        if GRAPH_KEY not in stored.files:
            raise ValueError(f"{path}: no '{GRAPH_KEY}' entry, so not an integer model written by "
                             "sd_jax.serve.integer.save; write it with save(quantize(...), path)")
        graph = json.loads(bytes(stored[GRAPH_KEY]).decode())
        params: dict[str, dict[str, Array]] = {}
        for key in stored.files:
            if key != GRAPH_KEY:
                layer, _, leaf = key.rpartition("/")
                params.setdefault(layer, {})[leaf] = jnp.asarray(stored[key])
    layers = tuple((name, _layer_shape(fields)) for name, fields in graph["layers"])
    return IntegerModel(params, graph["family"], graph["depth"], layers)


# ---- quantization of a float SD model ----

@dataclasses.dataclass(frozen=True)
class _Range:
    """A calibrated activation range as uint8: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    @classmethod
    def of(cls, values: Any) -> "_Range":
        values = np.asarray(values, np.float64)
        low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        scale = (high - low) / ACTIVATION_MAX if high > low else 1.0
        return cls(scale, int(np.clip(np.round(-low / scale), 0, ACTIVATION_MAX)))


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    """The subtree at a '/'-joined `path`; {} where it is absent (an SD layer without bias has no params)."""
    for key in path.split("/"):
        tree = tree.get(key, {})
    return tree


def _folded_layer(variables: Mapping[str, Any], name: str, bn: str | None, layout: SDLayout | None) -> dict[str, Any]:
    """Float pieces of a layer with its batch norm folded: {'basis', 'coeff'} (SD) or {'kernel'}, and
    'bias' (cout,), float64."""
    params = _lookup(variables["params"], name)
    if bn is None:
        scale = None
        bias = np.asarray(params.get("bias", 0.0), np.float64)
    else:
        bn_params, stats = _lookup(variables["params"], bn), _lookup(variables["batch_stats"], bn)
        scale = np.asarray(bn_params["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPSILON)
        bias = np.asarray(bn_params["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * scale
    if layout is None:
        kernel = np.asarray(params["kernel"], np.float64)
        return dict(kernel=kernel if scale is None else kernel * scale, bias=bias, cout=kernel.shape[-1])
    spec, options = layout.spec, layout.options
    coeff = np.asarray(_lookup(variables[SD_COEFF], name)["coeff"], np.float32)
    if options.mode == "latent":
        coeff = np.asarray(pow2.quantize_pow2(coeff, float(options.threshold), float(options.max_coeff)))
    coeff = np.where(np.asarray(_lookup(variables[SD_MASK], name)["mask"]), coeff, 0.0)
    basis = np.asarray(_lookup(variables[SD_BASIS], name)["basis"], np.float64)
    if scale is not None:
        basis = basis * np.repeat(scale, spec.blocks_per_output)[:, None, None]
    return dict(coeff=coeff, basis=basis, bias=bias * np.ones(spec.num_outputs), cout=spec.num_outputs)


def _integer_weights(folded: Mapping[str, Any], spec: blocking.BlockSpec | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The integer weight arrays of a layer and its int8 weight scale per output channel (float64)."""
    if spec is None:
        kernel = folded["kernel"]
        flat = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        scale = np.where(flat > 0, flat / WEIGHT_MAX, 1.0)
        return dict(kernel=np.round(kernel / scale).astype(np.int8)), scale
    coeff, basis = folded["coeff"], folded["basis"]
    per_output = basis.reshape(spec.num_outputs, -1)
    basis_scale = np.abs(per_output).max(axis=1)
    basis_scale = np.where(basis_scale > 0, basis_scale / WEIGHT_MAX, 1.0)  # (cout,)
    basis_int = np.round(basis / np.repeat(basis_scale, spec.blocks_per_output)[:, None, None]).astype(np.int8)
    nonzero = coeff != 0
    exponents = np.where(nonzero, np.frexp(coeff)[1] - 1, 0)  # coeff = ±2^e
    e_min = int(exponents[nonzero].min()) if nonzero.any() else 0
    shift = np.where(nonzero, exponents - e_min, 0)
    if shift.max(initial=0) + np.log2(spec.k * WEIGHT_MAX) >= 31:
        raise ValueError(f"an SD layer spans exponents {e_min}..{e_min + shift.max()}, too wide for an int32 "
                         "rebuild; clip C with a smaller max_coeff or a larger threshold")
    sign, shift = np.sign(coeff).astype(np.int8), shift.astype(np.int8)
    rebuilt = np.asarray(_rebuild(sign, shift, basis_int)).reshape(spec.num_outputs, -1)
    peak = np.abs(rebuilt).max(axis=1).astype(np.float64)
    weight_m0, weight_shift = quantize_multiplier(np.where(peak > 0, WEIGHT_MAX / np.maximum(peak, 1), 1.0))
    unit = 2.0**e_min * basis_scale  # real value of one W_int step, per output channel
    weight_scale = np.where(peak > 0, unit * peak / WEIGHT_MAX, unit)
    return dict(sign=sign, shift=shift, basis=basis_int, weight_m0=weight_m0, weight_shift=weight_shift), weight_scale


def _integer_layer(folded: Mapping[str, Any], shape: LayerShape, given: _Range, out: _Range | None,
                   relu: bool, name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Integer arrays of one layer on input range `given` (output requantization to `out` unless None),
    and its accumulator's real scale per output channel."""
    arrays, weight_scale = _integer_weights(folded, shape.spec)
    layer = dict(arrays, input_zero_point=np.int32(given.zero_point))
    kernel = np.asarray(_integer_kernel(arrays, shape), np.int64)
    weight_sum = kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)
    acc_scale = given.scale * weight_scale
    bias = np.round(folded["bias"] / acc_scale).astype(np.int64) + (INT8_OFFSET - given.zero_point) * weight_sum
    reduction = int(np.prod(shape.kernel_shape[:-1]))
    if accumulator_bound(reduction, bias) > INT32_MAX:
        raise ValueError(f"layer '{name}': a reduction over {reduction} inputs can overflow an int32 accumulator; "
                         "split the layer")
    layer["bias"] = bias.astype(np.int32)
    if out is not None:
        layer["m0"], layer["shift_out"] = quantize_multiplier(acc_scale / out.scale)
        layer["zero_point"] = np.int32(out.zero_point)
        layer["low"] = np.int32(out.zero_point if relu else 0)
    return layer, acc_scale


def _capture(model: nn.Module, variables: Mapping[str, Any], images: Array) -> tuple[dict[str, Any], dict]:
    """The model's intermediate outputs on `images` and the layouts of its SD layers."""
    with record_layouts() as layouts:
        _, state = model.apply(dict(variables), images, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
    outputs = {"/".join(k[:-1]): np.asarray(v[0]) for k, v in
               traverse_util.flatten_dict(state["intermediates"]).items()}
    return outputs, {"/".join(path): layout for path, layout in layouts.items()}


def quantize(model: nn.Module, variables: Mapping[str, Any], calibration_images: Any) -> IntegerModel:
    """The integer-only form of a zoo model (SD or dense layers) with its trained `variables`; activation
    ranges come from `calibration_images` (NHWC float, preprocessed as the model sees them).

    Raises ValueError for a model outside `SUPPORTED` or a layer whose integers cannot be made safe.
    """
    if not isinstance(model, (CifarResNet, MLP)):
        raise ValueError(f"integer inference supports the models {', '.join(SUPPORTED)}; got "
                         f"{type(model).__name__}. Evaluate other models with their float apply")
    if jnp.dtype(model.dtype) != jnp.float32:
        raise ValueError(f"integer inference quantizes a float32 model; build it with dtype=float32, not {model.dtype}")
    images = jnp.asarray(calibration_images, jnp.float32)
    outputs, layouts = _capture(model, variables, images)
    given = _Range.of(images)
    params: dict[str, dict[str, Any]] = {"input": dict(scale=np.float32(given.scale),
                                                       zero_point=np.int32(given.zero_point))}
    shapes: dict[str, LayerShape] = {}

    def add(name: str, bn: str | None, given: _Range, out: _Range | None, *, stride: int = 1, relu: bool = True):
        layout = layouts.get(name)
        folded = _folded_layer(variables, name, bn, layout)
        kernel_shape = layout.spec.shape if layout else folded["kernel"].shape
        pad = kernel_shape[0] // 2 if len(kernel_shape) == 4 else 0
        shapes[name] = LayerShape(tuple(kernel_shape), layout.spec if layout else None, (stride, stride),
                                  ((pad, pad), (pad, pad)))
        params[name], acc_scale = _integer_layer(folded, shapes[name], given, out, relu, name)
        return acc_scale

    if isinstance(model, MLP):
        for i in range(1, len(model.hidden) + 1):
            out = _Range.of(outputs[f"hidden{i}"])
            add(f"hidden{i}/dense", None, given, out)
            given = out
        last = given
        depth = 0
    else:
        depth = model.depth
        out = _Range.of(outputs["stem"])
        add("stem/conv", "stem/bn", given, out)
        given = out
        for name, _, stride in _resnet_blocks(depth):
            middle = _Range.of(np.maximum(outputs[f"{name}/bn1"], 0))
            add(f"{name}/conv1", f"{name}/bn1", given, middle, stride=stride)
            out = _Range.of(outputs[name])
            acc_scale = add(f"{name}/conv2", f"{name}/bn2", middle, None)
            m0, shift = quantize_multiplier(acc_scale / out.scale)
            residual_m0, residual_shift = quantize_multiplier(given.scale / out.scale)
            params[f"{name}/add"] = dict(m0=m0, shift_out=shift, residual_m0=residual_m0,
                                         residual_shift=residual_shift,
                                         residual_zero_point=np.int32(given.zero_point),
                                         zero_point=np.int32(out.zero_point), low=np.int32(out.zero_point))
            given = out
        features = outputs[_resnet_blocks(depth)[-1][0]]
        pooled = _Range.of(features.mean(axis=(1, 2)))
        positions = features.shape[1] * features.shape[2]
        m0, shift = quantize_multiplier(given.scale / (positions * pooled.scale))
        params["head/pool"] = dict(m0=m0, shift_out=shift, input_zero_point=np.int32(given.zero_point),
                                   zero_point=np.int32(pooled.zero_point))
        last = pooled
    acc_scale = add("head/dense", None, last, None, relu=False)
    params["logits"] = dict(scale=np.asarray(acc_scale, np.float32))
    params = jax.tree.map(jnp.asarray, params)
    return IntegerModel(params, "mlp" if isinstance(model, MLP) else "cifar_resnet", depth, tuple(shapes.items()))
