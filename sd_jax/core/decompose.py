"""SmartDeal decomposition of trained weights by alternating least squares (DESIGN.md 1.3).

Every weight is viewed as blocks A_b (m x k) (see `blocking`). For all blocks at once, starting from
B = I and C = sparsify(A):
  1. Cq = round-to-power-of-two(C), clipped to max_coeff; a block whose Cq did not change stops.
  2. B = argmin ||Cq B - A||.
  3. C = argmin ||C B - A|| (unconstrained).
  4. C = sparsify(C): structural pruning, the optional row rule, then the element threshold (with an
     optional per-row threshold decay when the threshold would empty a row).
It ends with Cq = round(C) and a last refit of B. Blocks are independent, so tensors whose blocks
share (m, k) and the static options are decomposed in one jitted call (`decompose_many`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.core import blocking, pow2
from sd_jax.core.lstsq import lstsq
from sd_jax.core.report import TensorReport, tensor_statistics

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecomposeOptions:
    """Every option of the reference decomposition; `validate` names the tensor in its errors.

    threshold: coefficients with |C| below it become 0 (0 disables element sparsity).
    max_coeff: largest |C|, a power of two (reference 32 = 2^5).
    iterations: most alternating rounds; each block stops early once its rounded C repeats.
    pow2: round C to powers of two (False keeps a float C: plain sparse low-rank-basis fitting).
    row_threshold: a row of C whose L1 norm is below it becomes 0 (reference: 5 * threshold; 0 = off).
    prune_fraction: fraction of rows of C (kernel rows of a k x k conv; rows of `row_length` inputs
        of a dense or 1 x 1 kernel) removed before decomposition, smallest L1 first, with one
        pattern shared by each group of `prune_group` output filters.
    row_scale: give each row of C a float scale (stored, 32 bits a row) and round C / scale, so the
        largest entry of every row is represented exactly.
    decay_steps, threshold_decay: when the element threshold would empty a row that survived the
        row rule and pruning, retry it with threshold * threshold_decay^j, j <= decay_steps.
    group_size, row_length, max_rows: the blocking (see `blocking.block_spec`).
    """

    threshold: float = 1e-3
    max_coeff: float = 32.0
    iterations: int = 30
    pow2: bool = True
    row_threshold: float = 0.0
    prune_fraction: float = 0.0
    prune_group: int = 32
    row_scale: bool = False
    decay_steps: int = 0
    threshold_decay: float = 0.5
    group_size: int = 64
    row_length: int = 3
    max_rows: int = 192

    def validate(self, name: str = "weight") -> "DecomposeOptions":
        """Return self, or raise ValueError naming `name`, the option and the fix."""
        def fail(problem: str) -> None:
            raise ValueError(f"{name}: {problem}")

        if not _finite_number(self.threshold) or self.threshold < 0:
            fail(f"threshold={self.threshold!r} must be a finite number >= 0 (reference: 1e-3 to 4e-3)")
        if not (_finite_number(self.max_coeff) and pow2.is_power_of_two(float(self.max_coeff))):
            fail(f"max_coeff={self.max_coeff!r} is not a power of two; pass e.g. 32.0 (= 2^5)")
        if self.pow2 and self.threshold > self.max_coeff:
            fail(f"threshold={self.threshold} exceeds max_coeff={self.max_coeff}; every C would be 0")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            fail(f"iterations={self.iterations!r} must be an integer >= 1 (reference: 30)")
        if not _finite_number(self.row_threshold) or self.row_threshold < 0:
            fail(f"row_threshold={self.row_threshold!r} must be >= 0 (0 turns the row rule off)")
        if not _finite_number(self.prune_fraction) or not 0 <= self.prune_fraction < 1:
            fail(f"prune_fraction={self.prune_fraction!r} must be in [0, 1)")
        if not isinstance(self.prune_group, int) or self.prune_group < 1:
            fail(f"prune_group={self.prune_group!r} must be a positive integer (reference: 32)")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            fail(f"decay_steps={self.decay_steps!r} must be an integer >= 0 (0 turns decay off)")
        if not _finite_number(self.threshold_decay) or not 0 < self.threshold_decay < 1:
            fail(f"threshold_decay={self.threshold_decay!r} must be in (0, 1)")
        for option in ("group_size", "row_length", "max_rows"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{option}={value!r} must be a positive integer")
        return self

    @classmethod
    def from_kwargs(cls, name: str = "weight", **kwargs: Any) -> "DecomposeOptions":
        """Options from keyword arguments; an unknown keyword raises ValueError listing the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{name}: unknown decomposition option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs).validate(name)

    def static_key(self) -> tuple:
        """Options that change the compiled computation (the rest are per-block arrays)."""
        return (self.iterations, self.pow2, self.row_scale, self.decay_steps)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) and math.isfinite(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decomposition:
    """A weight in SD form: blocks reconstruct as (scale *) coeff @ basis, then `from_blocks`.

    basis: (n, k, k) float32 B; coeff: (n, m, k) C, each entry 0 or +-2^e (a float when pow2 is off);
    mask: (n, m, k) bool, the non-zero pattern of C; row_scale: (n, m, 1) or None.
    """

    basis: Array
    coeff: Array
    mask: Array
    row_scale: Array | None
    spec: blocking.BlockSpec = dataclasses.field(metadata=dict(static=True))
    options: DecomposeOptions = dataclasses.field(metadata=dict(static=True))
    report: TensorReport | None = dataclasses.field(default=None, metadata=dict(static=True))

    def reconstruct(self) -> Array:
        """The weight C·B in its original shape."""
        return reconstruct_blocks(self.coeff, self.basis, self.row_scale, self.spec)


def reconstruct_blocks(coeff: Array, basis: Array, row_scale: Array | None, spec: blocking.BlockSpec) -> Array:
    """from_blocks((row_scale *) coeff @ basis) for one tensor."""
    if row_scale is not None:
        coeff = coeff * row_scale
    return blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", coeff, basis), spec)


def structural_keep_rows(blocks: Array, spec: blocking.BlockSpec, fraction: float, group: int) -> Array:
    """Rows of C kept after structural pruning, (n, m) bool.

    Per group of `group` output filters, the `fraction` of real rows with the smallest L1 norm
    (summed over the group's filters) is removed; padding rows are never counted or chosen.
    """
    per_output = blocks.reshape(spec.num_outputs, spec.blocks_per_output * spec.rows, spec.k)
    row_l1 = jnp.sum(jnp.abs(per_output), axis=-1)  # (outputs, rows of one output)
    real = blocking.real_rows(spec).reshape(-1)
    num_prune = int(math.floor(fraction * int(real.sum())))
    if num_prune == 0:
        return jnp.ones(spec.block_shape[:2], bool)
    groups = math.ceil(spec.num_outputs / group)
    padded = jnp.pad(row_l1, ((0, groups * group - spec.num_outputs), (0, 0)))
    group_l1 = padded.reshape(groups, group, -1).sum(axis=1)
    group_l1 = jnp.where(real, group_l1, jnp.inf)
    order = jnp.argsort(group_l1, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    keep = (rank >= num_prune) & real
    keep = jnp.repeat(keep, group, axis=0)[: spec.num_outputs]
    return keep.reshape(spec.block_shape[:2])


def _sparsify(c, keep_rows, threshold, row_threshold, threshold_decay, decay_steps):
    """Step 4 on C^T (n, k, m): structural zeros, the row rule, then the (decayed) element threshold."""
    c = jnp.where(keep_rows, c, 0.0)
    row_l1 = jnp.sum(jnp.abs(c), axis=1, keepdims=True)
    c = jnp.where(row_l1 < row_threshold, 0.0, c)
    element_threshold = threshold
    if decay_steps:
        row_max = jnp.max(jnp.abs(c), axis=1, keepdims=True)
        # Smallest j with row_max >= threshold * decay^j, capped at decay_steps.
        ratio = jnp.where(row_max > 0, row_max / jnp.maximum(threshold, 1e-30), 1.0)
        steps = jnp.clip(jnp.ceil(jnp.log(ratio) / jnp.log(threshold_decay)), 0, decay_steps)
        element_threshold = threshold * threshold_decay**steps
    return jnp.where(jnp.abs(c) < element_threshold, 0.0, c)


def _round(c, max_coeff, use_pow2, use_row_scale):
    """Step 1 on C^T (n, k, m): (row-scaled) power-of-two rounding with clipping -> (Cq, scale)."""
    if not use_row_scale:
        clipped = jnp.clip(c, -max_coeff, max_coeff)
        return (pow2.round_pow2(clipped) if use_pow2 else clipped), None
    row_max = jnp.max(jnp.abs(c), axis=1, keepdims=True)
    scale = jnp.where(row_max > 0, row_max / pow2.round_pow2(row_max), 1.0)
    scaled = jnp.clip(c / scale, -max_coeff, max_coeff)
    return (pow2.round_pow2(scaled) if use_pow2 else scaled), scale


@functools.partial(jax.jit, static_argnames=("iterations", "use_pow2", "use_row_scale", "decay_steps"))
def decompose_blocks(
    blocks: Array,
    keep_rows: Array,
    threshold: Array,
    max_coeff: Array,
    row_threshold: Array,
    threshold_decay: Array,
    *,
    iterations: int,
    use_pow2: bool = True,
    use_row_scale: bool = False,
    decay_steps: int = 0,
) -> dict[str, Array]:
    """The batched alternating least squares on blocks (n, m, k) with per-block options (n,).

    Returns coeff (n, m, k), basis (n, k, k), row_scale (n, m, 1) (ones when off) and the number of
    rounds each block ran, iterations (n,). Works internally on transposes (n, k, m), see `lstsq`.
    """
    n, _, k = blocks.shape
    keep_rows = keep_rows[:, None, :]
    a = jnp.where(keep_rows, jnp.swapaxes(blocks, 1, 2), 0.0)  # A^T: (n, k, m)
    per_block = lambda v: jnp.asarray(v, blocks.dtype).reshape(n, 1, 1)
    sparsify = functools.partial(
        _sparsify, keep_rows=keep_rows, threshold=per_block(threshold),
        row_threshold=per_block(row_threshold), threshold_decay=per_block(threshold_decay),
        decay_steps=decay_steps,
    )
    quantize = functools.partial(
        _round, max_coeff=per_block(max_coeff), use_pow2=use_pow2, use_row_scale=use_row_scale
    )
    identity = jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), (n, k, k))

    def rounded(c):
        cq, scale = quantize(c)
        return cq if scale is None else cq * scale

    def body(state):
        step, c, previous, done, rounds = state
        cq = rounded(c)
        done = done | (jnp.all(cq == previous, axis=(1, 2)) & (step > 0))
        basis = lstsq(cq, a)  # step 2: B = argmin ||Cq B - A||
        # Step 3: C B = A  <=>  B^T C^T = A^T; the columns of B^T are the rows of B.
        inverse = lstsq(basis, identity)  # X with C^T = X A^T
        c_new = sparsify(sum(inverse[:, :, i, None] * a[:, None, i, :] for i in range(k)))
        c = jnp.where(done[:, None, None], c, c_new)
        return step + 1, c, cq, done, rounds + (~done).astype(jnp.int32)

    def cond(state):
        step, _, _, done, _ = state
        return (step < iterations) & ~jnp.all(done)

    init = (jnp.int32(0), sparsify(a), jnp.zeros_like(a), jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32))
    _, c, _, _, rounds = jax.lax.while_loop(cond, body, init)
    cq, scale = quantize(c)
    basis = lstsq(cq if scale is None else cq * scale, a)
    scale = jnp.ones((n, 1, cq.shape[-1]), cq.dtype) if scale is None else scale
    return dict(
        coeff=jnp.swapaxes(cq, 1, 2), basis=basis, row_scale=jnp.swapaxes(scale, 1, 2), iterations=rounds
    )


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One tensor to decompose: its name (for errors and reports), weight, kind and options."""

    name: str
    weight: Any
    kind: str
    options: DecomposeOptions


def decompose_many(jobs: Sequence[TensorJob]) -> list[Decomposition]:
    """Decompose several tensors, batching all blocks with the same (m, k) and static options."""
    prepared = []
    for job in jobs:
        options = job.options.validate(job.name)
        weight = _checked_weight(job.name, job.weight)
        spec = blocking.block_spec(
            weight.shape, job.kind, group_size=options.group_size, row_length=options.row_length,
            max_rows=options.max_rows, name=job.name,
        )
        blocks = blocking.to_blocks(weight, spec)
        keep = structural_keep_rows(blocks, spec, options.prune_fraction, options.prune_group)
        prepared.append((job, options, spec, blocks, keep))

    buckets: dict[tuple, list[int]] = {}
    for index, (_, options, spec, _, _) in enumerate(prepared):
        buckets.setdefault((spec.rows, spec.k) + options.static_key(), []).append(index)

    results: list[Decomposition | None] = [None] * len(prepared)
    for members in buckets.values():
        parts = [prepared[i] for i in members]
        sizes = [spec.num_blocks for _, _, spec, _, _ in parts]
        options0 = parts[0][1]

        def per_block(field: str) -> Array:
            return jnp.concatenate(
                [jnp.full((spec.num_blocks,), getattr(o, field), jnp.float32) for _, o, spec, _, _ in parts]
            )

        blocks = jnp.concatenate([b for _, _, _, b, _ in parts])
        out = decompose_blocks(
            blocks, jnp.concatenate([kp for _, _, _, _, kp in parts]), per_block("threshold"),
            per_block("max_coeff"), per_block("row_threshold"), per_block("threshold_decay"),
            iterations=options0.iterations, use_pow2=options0.pow2, use_row_scale=options0.row_scale,
            decay_steps=options0.decay_steps,
        )
        segment = jnp.repeat(jnp.arange(len(parts)), np.array(sizes), total_repeat_length=blocks.shape[0])
        stats = tensor_statistics(blocks, out["coeff"], out["basis"], out["row_scale"], segment, len(parts))
        offsets = np.cumsum([0] + sizes)
        for j, (job, options, spec, _, _) in enumerate(parts):
            piece = slice(int(offsets[j]), int(offsets[j + 1]))
            coeff = out["coeff"][piece]
            row_scale = out["row_scale"][piece] if options.row_scale else None
            report = TensorReport.from_statistics(
                job.name, job.kind, spec, options, {key: value[j] for key, value in stats.items()},
                rounds=int(out["iterations"][piece].max()),
            )
            results[members[j]] = Decomposition(
                basis=out["basis"][piece], coeff=coeff, mask=coeff != 0, row_scale=row_scale,
                spec=spec, options=options, report=report,
            )
    return results


def _checked_weight(name: str, weight: Any) -> Array:
    try:
        array = jnp.asarray(weight)
    except TypeError as error:
        raise ValueError(f"{name}: cannot read the weight as an array ({error}); pass a numeric array") from None
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name}: weight dtype {array.dtype} is not floating point; pass float weights")
    if not bool(jnp.all(jnp.isfinite(array))):
        bad = int(jnp.sum(~jnp.isfinite(array)))
        raise ValueError(f"{name}: weight has {bad} non-finite value(s) (NaN or inf); fix the checkpoint first")
    return array.astype(jnp.float32)


def decompose(
    weight: Any,
    *,
    kind: str,
    threshold: float = 1e-3,
    max_coeff: float = 32.0,
    iterations: int = 30,
    name: str = "weight",
    **options: Any,
) -> Decomposition:
    """Decompose one weight tensor into SD form; see `DecomposeOptions` for every option.

    kind: "conv" (Flax (kh, kw, cin, cout); 1 x 1 kernels use the dense blocking), "dense"
    ((din, dout)) or "depthwise" ((kh, kw, 1, channels)).
    """
    if kind not in blocking.KINDS:
        raise ValueError(f"{name}: unknown kind {kind!r}; pass one of {blocking.KINDS}")
    opts = DecomposeOptions.from_kwargs(
        name, threshold=threshold, max_coeff=max_coeff, iterations=iterations, **options
    )
    return decompose_many([TensorJob(name, weight, kind, opts)])[0]
