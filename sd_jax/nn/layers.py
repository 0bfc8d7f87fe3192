"""SD layers: a conv or dense layer whose kernel is stored as W = from_blocks(q(C) ⊙ mask · B).

`SDConv` and `SDDense` take the constructor keywords of `nn.Conv` / `nn.Dense` that the model zoo
uses (features, kernel_size, strides, padding, use_bias, feature_group_count, kernel_dilation, name,
dtype), so `models.get(name, sd=True)` (factories from `sd_jax.nn.rules.SDRules`) builds an SD
network. The forward passes are the functions `sd_conv_forward` / `sd_dense_forward`, which declare
the variables in whatever module calls them: an SDConv / SDDense, or an nn.Conv / nn.Dense swapped
by `sd_jax.nn.swap`. Their variables:

    sd_basis / <layer> / basis   (n, k, k) float32, B, one basis per block
    sd_coeff / <layer> / coeff   (n, m, k) float32, C
    sd_mask  / <layer> / mask    (n, m, k) bool, the fixed non-zero pattern of C; never trained
    params   / <layer> / bias    (features,), when use_bias

with (n, m, k) the block shape of `sd_jax.core.blocking.block_spec(kernel shape, kind)`. The forward
pass rebuilds the kernel (once per call: a batched (m, k) x (k, k) product and one transpose into
the kernel layout; measured no slower than a fused multiply-add form on CPU) and runs the ordinary
convolution or matrix product.

Coefficient modes:
- 'latent': C is a float latent; every forward pass quantizes it (sparsify below `threshold`, clip to
  `max_coeff`, round to a power of two) with a straight-through gradient (docs/method.md 1.4, "simpler
  alternative").
- 'pow2': C already holds 0 or ±2^e (kept so by the bucket-switch update); it is used as is, and its
  gradient is that of W with respect to C.

From-scratch initialisation: C is drawn at the weight's scale, N(0, variance / fan_in) for the LeCun
(1, the nn.Conv / nn.Dense default) or He (2) initialiser (stored as is in 'latent' mode, quantized in
'pow2' mode), the mask is the non-zero pattern of q(C) on the real (unpadded) rows, and each block's
basis is a random orthogonal matrix times one scale per layer near 1, chosen so the rebuilt kernel
has the initialiser's variance. An orthogonal basis keeps every row of a block at the norm of its row
of C, so the variance holds per layer rather than only on average over seeds. `init_scheme='reference'`
draws as the authors do (C Kaiming fan_out over the (n, m, k) tensor, B ~ N(0, 1/k)). Either way the
scale lives in C, so C and B train at comparable speed (`init_sd_blocks` says why that matters).

Low precision (docs/method.md 1.4, the paper's energy experiments; both off by default):
- `activation_bits=N`: the layer input is quantized (`fixed_point.quantize_activation`, straight-through
  gradient) to 2^N evenly spaced levels. In training the range is each sample's [min, max]
  (`activation_range='batch'`: the batch mean of those, as the authors' QuantMeasure); at
  evaluation it is a running range, the mean over the batch of the per-sample min and max averaged
  with momentum `range_momentum` (default `RANGE_MOMENTUM` 0.9 of the old value, as batch norm; the
  authors keep 0.1; the first training step takes the batch's range as is), kept in a non-trainable
  collection like batch_stats:

      sd_quant / <layer> / low, high   () float32, the running range
      sd_quant / <layer> / count       () int32, training steps seen (0: evaluation leaves x as is)

- `stored_activation_bits=N` (4 or 8): the forward pass is exact, but the copy of the layer input
  kept for the backward pass is N bits per entry (`sd_jax.core.stored_activation`): the input
  gradient stays exact and the kernel gradient is taken at the dequantized input. Unlike the two
  quantizers around it this is no training numerics choice but a memory saving; it needs no
  variables and works the same in training and evaluation (where no backward pass runs).
- `gradient_bits=N`: in training the layer output goes through `fixed_point.quantize_gradient`, so the
  cotangent reaching the layer (and with it the gradients of B, C, the bias and the layer input) is
  N bits per sample with unbiased stochastic rounding. The noise comes from the 'quant' rng stream
  (`rngs={"quant": key}`; flax folds in the layer path, `train_step` folds in the step).

A layer trains when the `sd_quant` collection is mutable (`apply(..., mutable=["batch_stats",
"sd_quant"])`, as `sd_jax.train.step.train_step` does) and evaluates otherwise; evaluation needs no
'quant' rng. Both quantizers work in float32 and hand back the compute dtype.

Compute dtype (`dtype=jnp.bfloat16`, the zoo's `models.get(..., dtype=...)`): the variables stay
float32 and the kernel is rebuilt in float32, then the input, kernel and bias are cast to `dtype` for
the convolution or product.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

from sd_jax.core import blocking, fixed_point, pow2, stored_activation
from sd_jax.core.decompose import DecomposeOptions

Array = jax.Array
Initializer = Callable[..., Array]

SD_BASIS = "sd_basis"
SD_COEFF = "sd_coeff"
SD_MASK = "sd_mask"
SD_COLLECTIONS = (SD_BASIS, SD_COEFF, SD_MASK)
# Running activation ranges of layers with activation_bits; updated by training steps, like batch_stats.
SD_QUANT = "sd_quant"
QUANT_RNG = "quant"
RANGE_MOMENTUM = 0.9
ACTIVATION_RANGES = ("sample", "batch")
MAX_BITS = 24  # the fixed-point quantizers' limit

MODES = ("latent", "pow2")
# Kernel variance times fan_in of the initialisers an SD layer can match.
INIT_VARIANCE_SCALE = {"lecun": 1.0, "he": 2.0}
# 'unit_coeff': C ~ N(0, 1) with the LeCun scale in B, as sd_jax drew before 2026-11-30; kept for the
# ablation that shows why it learns slowly (RESULTS.md).
INIT_SCHEMES = (*INIT_VARIANCE_SCALE, "reference", "unit_coeff")


def init_sd_blocks(
    key: Array,
    spec: blocking.BlockSpec,
    *,
    fan_in: int,
    init_scheme: str,
    mode: str,
    threshold: float,
    max_coeff: float,
) -> tuple[Array, Array, Array]:
    """From-scratch (coeff (n, m, k), basis (n, k, k), mask (n, m, k) bool) for one kernel.

    The weight's scale lives in C and B is of order one, as in the reference, so that SGD moves the
    rebuilt kernel through C as fast as through B: dW = dC·B with dC = -lr·dL/dW·B^T changes W by
    about lr·|B|^2·dL/dW. With C of order one and B at the weight's scale s instead, that step shrinks
    by s^2 (about 1e-2) and the network learns almost only through the k x k bases.

    'lecun' / 'he': C ~ N(0, variance_scale / fan_in) quantized, B a random orthogonal matrix per block
    times one scale per layer near 1 that gives the rebuilt kernel exactly that variance over its real
    entries ('unit_coeff': C ~ N(0, 1), the LeCun kernel variance, the scale in B). 'reference': the
    authors' draw, C ~ N(0, 2 / fan_out) with fan_out = n·k as PyTorch's kaiming_normal_(mode='fan_out')
    counts it for the (n, m, k) tensor, and B ~ N(0, 1/k).
    """
    coeff_key, basis_key = jax.random.split(key)
    n, m, k = spec.block_shape
    real = jnp.tile(blocking.real_rows(spec), (spec.num_outputs, 1))[:, :, None]  # (n, m, 1)
    if init_scheme == "reference":
        latent = jax.random.normal(coeff_key, (n, m, k), jnp.float32) * math.sqrt(2.0 / (n * k))
        basis = jax.random.normal(basis_key, (n, k, k), jnp.float32) / math.sqrt(k)
    else:
        variance = INIT_VARIANCE_SCALE.get(init_scheme, 1.0) / fan_in
        coeff_scale = 1.0 if init_scheme == "unit_coeff" else math.sqrt(variance)
        latent = jax.random.normal(coeff_key, (n, m, k), jnp.float32) * coeff_scale
        basis = jax.random.orthogonal(basis_key, k, shape=(n,), dtype=jnp.float32)
    quantized = pow2.quantize_pow2(latent, threshold, max_coeff)
    mask = real & (quantized != 0)
    quantized = jnp.where(mask, quantized, 0.0)
    if init_scheme != "reference":
        # A row of W is a row of q(C) times r·Q with Q orthogonal: its squared norm is r^2 times the
        # row's, so mean(W^2) over the real entries is r^2 · mean(q(C)^2) over the same entries.
        second_moment = jnp.sum(quantized**2) / (jnp.sum(real) * k)
        basis = basis * jnp.sqrt(variance / jnp.maximum(second_moment, 1e-30))
    coeff = quantized if mode == "pow2" else jnp.where(mask, latent, 0.0)
    return coeff, basis, mask


def rebuild_kernel(
    coeff: Array,
    basis: Array,
    mask: Array,
    spec: blocking.BlockSpec,
    *,
    mode: str,
    threshold: float,
    max_coeff: float,
) -> Array:
    """The kernel from_blocks(q(C) ⊙ mask · B) in its layer shape (q is the identity in 'pow2' mode)."""
    if mode == "latent":
        coeff = pow2.quantize_pow2_ste(coeff, threshold, max_coeff)
    coeff = jnp.where(mask, coeff, 0.0)
    return blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", coeff, basis), spec)


@dataclasses.dataclass(frozen=True)
class SDOptions:
    """The SD options of one layer: the fields SDConv / SDDense add to nn.Conv / nn.Dense."""

    mode: str = "latent"
    threshold: float = DecomposeOptions.threshold  # the options a layer shares with the decomposition
    max_coeff: float = DecomposeOptions.max_coeff
    init_scheme: str = "lecun"
    group_size: int = DecomposeOptions.group_size
    row_length: int = DecomposeOptions.row_length
    max_rows: int = DecomposeOptions.max_rows
    kind: str | None = None  # convs only; None: 'depthwise' for one input channel per group, else 'conv'
    activation_bits: int | None = None  # None: full-precision layer input
    gradient_bits: int | None = None  # None: full-precision cotangent
    # Training range of the quantized input: "sample" (each sample's min and max) or "batch" (the
    # batch means of those, the authors' QuantMeasure); the running range keeps range_momentum of
    # its old value per step (authors: 0.1).
    activation_range: str = "sample"
    range_momentum: float = RANGE_MOMENTUM
    # Bits of the input copy kept for the backward pass (4 or 8; None or 0: exact); the forward pass
    # stays exact (`sd_jax.core.stored_activation`).
    stored_activation_bits: int | None = None

    def check(self, layer: str) -> "SDOptions":
        """Return self, or raise ValueError naming `layer`, the option and the fix."""
        if self.mode not in MODES:
            raise ValueError(f"layer '{layer}': mode {self.mode!r} is not one of {MODES}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"layer '{layer}': init_scheme {self.init_scheme!r} is not one of {INIT_SCHEMES}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"layer '{layer}': threshold={self.threshold!r} must be a finite number >= 0")
        if not (isinstance(self.max_coeff, (int, float)) and pow2.is_power_of_two(float(self.max_coeff))):
            raise ValueError(f"layer '{layer}': max_coeff={self.max_coeff!r} is not a power of two; pass e.g. 32.0")
        if self.activation_range not in ACTIVATION_RANGES:
            raise ValueError(f"layer '{layer}': activation_range {self.activation_range!r} is not one of "
                             f"{ACTIVATION_RANGES}")
        if not (isinstance(self.range_momentum, (int, float)) and 0 <= self.range_momentum < 1):
            raise ValueError(f"layer '{layer}': range_momentum={self.range_momentum!r} must be in [0, 1) "
                             "(the share of the old running range kept each step)")
        for option in ("activation_bits", "gradient_bits"):
            bits = getattr(self, option)
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS):
                raise ValueError(f"layer '{layer}': {option}={bits!r} is not None or an integer in [1, {MAX_BITS}]; "
                                 f"pass e.g. {option}=8, or None for full precision")
        if self.stored_activation_bits:
            stored_activation.check_bits(self.stored_activation_bits, f"layer '{layer}': stored_activation_bits")
        return self


_DEFAULT = SDOptions()
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(SDOptions))


@dataclasses.dataclass(frozen=True)
class SDLayout:
    """How one SD layer stores its kernel: the blocking and the options that rebuild it."""

    spec: blocking.BlockSpec
    options: SDOptions


# While `record_layouts` runs, every SD kernel built registers its layout here under its module path.
_LAYOUTS: contextvars.ContextVar[dict[tuple[str, ...], SDLayout] | None] = contextvars.ContextVar(
    "sd_layouts", default=None)


@contextlib.contextmanager
def record_layouts() -> Iterator[dict[tuple[str, ...], SDLayout]]:
    """Collect {module path: SDLayout} of every SD kernel built (traced) inside the block."""
    layouts: dict[tuple[str, ...], SDLayout] = {}
    token = _LAYOUTS.set(layouts)
    try:
        yield layouts
    finally:
        _LAYOUTS.reset(token)


def _sd_kernel(module: nn.Module, layer: str, options: SDOptions, shape: tuple[int, ...], kind: str,
               fan_in: int) -> Array:
    """Declare (or read) the SD variables of `module` for a kernel of `shape` and return the kernel."""
    spec = blocking.block_spec(
        shape, kind, group_size=options.group_size, row_length=options.row_length,
        max_rows=options.max_rows, name=f"layer '{layer}'",
    )
    if not module.is_initializing():
        missing = [f"{collection}/{'/'.join(module.scope.path)}/{leaf}"
                   for collection, leaf in ((SD_COEFF, "coeff"), (SD_BASIS, "basis"), (SD_MASK, "mask"))
                   if not module.has_variable(collection, leaf)]
        if missing:
            raise ValueError(
                f"layer '{layer}': the variables have no {', '.join(missing)}; they belong to a model where "
                "this layer is dense. Convert them with `sd_jax.nn.to_sd` and the rules the model was built with"
            )
    initial = {}

    def initial_value(which: str) -> Array:
        # C, B and the mask are drawn together (B's scale depends on C); only when initialising.
        if not initial:
            coeff, basis, mask = init_sd_blocks(
                module.make_rng("params"), spec, fan_in=fan_in,
                init_scheme=options.init_scheme, mode=options.mode,
                threshold=float(options.threshold), max_coeff=float(options.max_coeff),
            )
            initial.update(coeff=coeff, basis=basis, mask=mask)
        return initial[which]

    coeff = module.variable(SD_COEFF, "coeff", initial_value, "coeff").value
    basis = module.variable(SD_BASIS, "basis", initial_value, "basis").value
    mask = module.variable(SD_MASK, "mask", initial_value, "mask").value
    for variable, value in (("coeff", coeff), ("basis", basis), ("mask", mask)):
        expected = spec.block_shape if variable != "basis" else (spec.num_blocks, spec.k, spec.k)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"layer '{layer}': {variable} has shape {tuple(value.shape)}, but a {kind} kernel "
                f"{shape} with this blocking needs {expected}; convert the variables with the same "
                "group_size, row_length and max_rows"
            )
    layouts = _LAYOUTS.get()
    if layouts is not None:
        layouts[tuple(module.scope.path)] = SDLayout(spec, options)
    return rebuild_kernel(
        coeff, basis, mask, spec, mode=options.mode,
        threshold=float(options.threshold), max_coeff=float(options.max_coeff),
    )


def _bias(module: nn.Module, features: int, use_bias: bool, bias_init: Initializer) -> Array | None:
    if not use_bias:
        return None
    return module.param("bias", bias_init, (features,), jnp.float32)


def _pair(value: int | Sequence[int], what: str, layer: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"layer '{layer}': {what} {value!r} is not an int or a pair; SD convolutions are 2-D only")
    return pair


def _training(module: nn.Module) -> bool:
    """Whether `module` runs a training step: the running ranges are mutable and this is not `init`."""
    return module.is_mutable_collection(SD_QUANT) and not module.is_initializing()


def _quantize_input(module: nn.Module, x: Array, layer: str, options: SDOptions) -> Array:
    """The layer input at `activation_bits` (per-sample range in training, running range at evaluation)."""
    bits = options.activation_bits
    if bits is None:
        return x
    leaves = ("low", "high", "count")
    if not module.is_initializing() and not all(module.has_variable(SD_QUANT, leaf) for leaf in leaves):
        raise ValueError(
            f"layer '{layer}': activation_bits={bits} needs the running range {SD_QUANT}/"
            f"{'/'.join(module.scope.path)}/{{low,high,count}}, which the variables lack (e.g. they come from "
            f"`to_sd` or a model without activation_bits); add the '{SD_QUANT}' collection of this model's `init`")
    low = module.variable(SD_QUANT, "low", jnp.zeros, (), jnp.float32)
    high = module.variable(SD_QUANT, "high", jnp.zeros, (), jnp.float32)
    count = module.variable(SD_QUANT, "count", jnp.zeros, (), jnp.int32)
    x32 = x.astype(jnp.float32)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if not _training(module):
        # An empty running range (count 0: low == high == 0) leaves x unchanged.
        return fixed_point.quantize_activation(x32, bits, low.value, high.value).astype(out_dtype)
    sample_low, sample_high = jax.lax.stop_gradient(fixed_point.per_sample_range(x32))  # (batch, 1, ...)
    batch_low, batch_high = jnp.mean(sample_low), jnp.mean(sample_high)
    first = count.value == 0
    keep = options.range_momentum
    low.value = jnp.where(first, batch_low, keep * low.value + (1 - keep) * batch_low)
    high.value = jnp.where(first, batch_high, keep * high.value + (1 - keep) * batch_high)
    count.value = count.value + 1
    if options.activation_range == "batch":
        return fixed_point.quantize_activation(x32, bits, batch_low, batch_high).astype(out_dtype)
    return fixed_point.quantize_activation(x32, bits, sample_low, sample_high).astype(out_dtype)


def _quantize_output_gradient(module: nn.Module, y: Array, layer: str, options: SDOptions) -> Array:
    """y unchanged; in training its cotangent is quantized to `gradient_bits` with stochastic rounding."""
    bits = options.gradient_bits
    if bits is None or not _training(module):
        return y
    if not module.has_rng(QUANT_RNG):
        raise ValueError(
            f"layer '{layer}': gradient_bits={bits} needs a '{QUANT_RNG}' rng in training; pass "
            f"rngs={{'{QUANT_RNG}': key}} to apply, with a new key every step (train_step does)")
    key = module.make_rng(QUANT_RNG)
    return fixed_point.quantize_gradient(y.astype(jnp.float32), bits, key).astype(y.dtype)


def stored_input_op(op: Callable[..., Array], options: SDOptions) -> Callable[..., Array]:
    """`op` (lax.conv_general_dilated or lax.dot_general), keeping its input at the options'
    `stored_activation_bits` for the backward pass (`op` itself when they are None or 0)."""
    bits = options.stored_activation_bits
    return stored_activation.with_stored_input(op, bits) if bits else op


def sd_conv_forward(
    module: nn.Module,
    x: Array,
    *,
    layer: str,
    options: SDOptions,
    features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    dtype: Any = None,
    bias_init: Initializer = nn.initializers.zeros_init(),
) -> Array:
    """The SD convolution of `x`, with its variables declared in `module` (an SDConv, or a swapped nn.Conv)."""
    options.check(layer)
    if x.ndim != 4:
        raise ValueError(f"layer '{layer}': input shape {tuple(x.shape)} is not (batch, height, width, channels)")
    kernel_size = _pair(kernel_size, "kernel_size", layer)
    strides = _pair(strides, "strides", layer)
    dilation = _pair(kernel_dilation, "kernel_dilation", layer)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise ValueError(f"layer '{layer}': padding {padding!r} is not supported; use 'SAME', 'VALID' or pairs")
    padding = canonicalize_padding(padding, 2)
    in_features = x.shape[-1]
    groups = feature_group_count
    if in_features % groups or features % groups:
        raise ValueError(
            f"layer '{layer}': feature_group_count={groups} must divide the input channels "
            f"({in_features}) and features ({features})"
        )
    shape = (*kernel_size, in_features // groups, features)
    kind = options.kind or ("depthwise" if shape[2] == 1 and groups == features and groups > 1 else "conv")
    kernel = _sd_kernel(module, layer, options, shape, kind, fan_in=math.prod(shape[:3]))
    bias = _bias(module, features, use_bias, bias_init)
    x = _quantize_input(module, x, layer, options)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = stored_input_op(jax.lax.conv_general_dilated, options)(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )
    return _quantize_output_gradient(module, y if bias is None else y + bias, layer, options)


def sd_dense_forward(
    module: nn.Module,
    x: Array,
    *,
    layer: str,
    options: SDOptions,
    features: int,
    use_bias: bool = True,
    dtype: Any = None,
    bias_init: Initializer = nn.initializers.zeros_init(),
) -> Array:
    """The SD dense layer on the last axis of `x`, with its variables declared in `module`."""
    options.check(layer)
    if options.kind not in (None, "dense"):
        raise ValueError(f"layer '{layer}': kind {options.kind!r} is not possible for a dense layer; "
                         "drop the kind option or set it to 'dense'")
    shape = (x.shape[-1], features)
    kernel = _sd_kernel(module, layer, options, shape, "dense", fan_in=shape[0])
    bias = _bias(module, features, use_bias, bias_init)
    x = _quantize_input(module, x, layer, options)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = stored_input_op(jax.lax.dot_general, options)(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return _quantize_output_gradient(module, y if bias is None else y + bias, layer, options)


def _layer_name(module: nn.Module) -> str:
    """The module's path joined by '/' (`stage1_block0/conv1`), or its own name for a root module."""
    return "/".join(module.path) or module.name


def _options_of(module: nn.Module) -> SDOptions:
    return SDOptions(**{name: getattr(module, name, None) for name in OPTION_NAMES})


class SDConv(nn.Module):
    """2-D convolution (NHWC input, (kh, kw, cin / groups, features) kernel) with an SD kernel.

    Constructor keywords of nn.Conv, plus the SD options (`SDOptions`): `mode` ('latent' or 'pow2'),
    `threshold` and `max_coeff` of the quantizer, `init_scheme` (one of INIT_SCHEMES), the blocking
    (`group_size`, `row_length`, `max_rows`), `kind` (default: 'depthwise' for one input channel
    per group and group count = features, else 'conv'), and the low-precision options
    `activation_bits` and `gradient_bits` (None: off), `activation_range`, `range_momentum` and
    `stored_activation_bits` (see the module docstring).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    mode: str = _DEFAULT.mode
    threshold: float = _DEFAULT.threshold
    max_coeff: float = _DEFAULT.max_coeff
    init_scheme: str = _DEFAULT.init_scheme
    group_size: int = _DEFAULT.group_size
    row_length: int = _DEFAULT.row_length
    max_rows: int = _DEFAULT.max_rows
    kind: str | None = _DEFAULT.kind
    activation_bits: int | None = _DEFAULT.activation_bits
    gradient_bits: int | None = _DEFAULT.gradient_bits
    activation_range: str = _DEFAULT.activation_range
    range_momentum: float = _DEFAULT.range_momentum
    stored_activation_bits: int | None = _DEFAULT.stored_activation_bits

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return sd_conv_forward(
            self, x, layer=_layer_name(self), options=_options_of(self), features=self.features,
            kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
            use_bias=self.use_bias, dtype=self.dtype,
        )


class SDDense(nn.Module):
    """Dense layer on the last axis ((din, features) kernel) with an SD kernel.

    Constructor keywords of nn.Dense, plus the SD options of `SDConv` (`kind` is always 'dense').
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    mode: str = _DEFAULT.mode
    threshold: float = _DEFAULT.threshold
    max_coeff: float = _DEFAULT.max_coeff
    init_scheme: str = _DEFAULT.init_scheme
    group_size: int = _DEFAULT.group_size
    row_length: int = _DEFAULT.row_length
    max_rows: int = _DEFAULT.max_rows
    activation_bits: int | None = _DEFAULT.activation_bits
    gradient_bits: int | None = _DEFAULT.gradient_bits
    activation_range: str = _DEFAULT.activation_range
    range_momentum: float = _DEFAULT.range_momentum
    stored_activation_bits: int | None = _DEFAULT.stored_activation_bits

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return sd_dense_forward(self, x, layer=_layer_name(self), options=_options_of(self), features=self.features,
                                use_bias=self.use_bias, dtype=self.dtype)


def _low_precision_call(module: nn.Module, dense_call: Callable[[Array], Array], inputs: Array) -> Array:
    layer = _layer_name(module)
    options = module.quantizer.check(layer)
    y = dense_call(_quantize_input(module, inputs, layer, options))
    return _quantize_output_gradient(module, y, layer, options)


class LowPrecisionConv(nn.Conv):
    """nn.Conv with the SD layers' low-precision numerics and a dense kernel: the input at
    `quantizer.activation_bits`, the cotangent at `quantizer.gradient_bits` (see the module
    docstring; only the quantizer fields of the SDOptions count). The dense 8-bit baseline of the
    paper's training claims is a network of these. `quantizer.stored_activation_bits` goes in as
    the layer's `conv_general_dilated` (`low_precision_factories`)."""

    quantizer: SDOptions = _DEFAULT

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        return _low_precision_call(self, super().__call__, inputs)


class LowPrecisionDense(nn.Dense):
    """nn.Dense with the numerics of `LowPrecisionConv`."""

    quantizer: SDOptions = _DEFAULT

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        return _low_precision_call(self, super().__call__, inputs)


QUANTIZER_OPTIONS = ("activation_bits", "gradient_bits", "activation_range", "range_momentum",
                     "stored_activation_bits")


def low_precision_factories(**quantizer: Any) -> dict[str, Callable[..., nn.Module]]:
    """The zoo's `conv` / `dense` factories for a dense network with the SD layers' quantizers
    (keywords: QUANTIZER_OPTIONS, e.g. activation_bits=8, gradient_bits=8)."""
    unknown = sorted(set(quantizer) - set(QUANTIZER_OPTIONS))
    if unknown:
        raise ValueError(f"low-precision dense layers: unknown option(s) {unknown}; pass {QUANTIZER_OPTIONS}")
    options = SDOptions(**quantizer).check("low-precision dense layers")
    conv_op = stored_input_op(jax.lax.conv_general_dilated, options)
    dense_op = stored_input_op(jax.lax.dot_general, options)
    return {"conv": lambda **kwargs: LowPrecisionConv(**kwargs, quantizer=options, conv_general_dilated=conv_op),
            "dense": lambda **kwargs: LowPrecisionDense(**kwargs, quantizer=options, dot_general=dense_op)}
