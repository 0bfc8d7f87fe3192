"""SmartDeal decomposition of trained weights by alternating least squares (docs/method.md 1.3).

Every weight is viewed as blocks A_b (m x k) (see `blocking`). For all blocks at once, starting from
B = I and C = sparsify(A):
  1. Cq = round-to-power-of-two(C), clipped to max_coeff; a block whose Cq did not change stops.
  2. B = argmin ||Cq B - A||.
  3. C = argmin ||C B - A|| (unconstrained).
  4. C = sparsify(C): the optional row rule, then the element threshold (with an optional per-row
     threshold decay when the threshold would empty a row).
It ends with Cq = round(C) and a last refit of B. Blocks are independent, so tensors whose blocks
share (m, k) and the static options are decomposed in one jitted call (`decompose_many`).

Structural pruning (docs/method.md 1.2) runs once, on the host, before the loop: it zeroes the pruned
entries of A, so the decomposition fits the pruned weight (`structural_keep`, `PRUNE_CRITERIA`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.core import blocking, pow2
from sd_jax.core.lstsq import lstsq
from sd_jax.core.report import TensorReport, tensor_statistics

Array = jax.Array

# How structural pruning picks what it removes: sd_jax's rule, then the authors' three `prune_type`s.
PRUNE_CRITERIA = ("sd_jax", "population", "value", "energy")
# What the threshold counts in: weight units (the reference) or units of each layer's RMS.
THRESHOLD_SCALES = ("absolute", "layer")


@dataclasses.dataclass(frozen=True)
class DecomposeOptions:
    """Every option of the reference decomposition; `validate` names the tensor in its errors.

    threshold: coefficients with |C| below it become 0 (0 disables element sparsity).
    max_coeff: largest |C|, a power of two (reference 32 = 2^5).
    iterations: most alternating rounds; each block stops early once its rounded C repeats.
    pow2: round C to powers of two (False keeps a float C: plain sparse low-rank-basis fitting).
    row_threshold: a row of C whose L1 norm is below it becomes 0 (reference: 5 * threshold; 0 = off).
    prune_criterion: how structural pruning picks what it removes before decomposition, with one
        pattern shared by each group of `prune_group` consecutive output filters, by L1 norm summed
        over the group (see `structural_keep`):
        'sd_jax': the floor of `prune_fraction` times the rows of C (kernel rows of a k x k conv,
            rows of `row_length` inputs of a dense or 1 x 1 kernel), smallest first;
        'population', 'value', 'energy': the authors' rule (SmartDeal-Training/se/alg_structural.py,
            `prune_type`): units are kernel rows of k x k and depthwise convs and single input
            channels of 1 x 1 convs; dense layers are never pruned. 'population' removes the ceiling
            of `prune_fraction` times the units, smallest first; 'value' removes the units whose
            group L1 is below `prune_threshold`; 'energy' keeps units until they hold the share
            `prune_threshold` of the group's L1 (counted as their code counts it, see
            `reference_pruned_count`) and removes the rest, smallest first.
    prune_fraction: fraction of rows or units removed ('sd_jax', 'population'; 0 = off).
    prune_threshold: the authors' `prune_threshold` for 'value' (an L1 floor) and 'energy' (a share
        in [0, 1]); 0 = off (their energy loop at 0 would remove all units but one).
    row_scale: give each row of C a float scale (stored, 32 bits a row) and round C / scale, so the
        largest entry of every row is represented exactly.
    decay_steps, threshold_decay: when the element threshold would empty a row that survived the
        row rule and pruning, retry it with threshold * threshold_decay^j, j <= decay_steps.
    group_size, row_length, max_rows: the blocking (see `blocking.block_spec`).
    threshold_scale: what threshold, row_threshold and max_coeff count in. 'absolute' (the
        reference): weight units. 'layer': units of the layer's RMS, rounded to the nearest power of
        two (the weight is divided by it before decomposing and B multiplied by it after, so C stays
        powers of two); weights of any scale then decompose alike.
    """

    threshold: float = 1e-3
    max_coeff: float = 32.0
    iterations: int = 30
    pow2: bool = True
    row_threshold: float = 0.0
    prune_criterion: str = "sd_jax"
    prune_fraction: float = 0.0
    prune_threshold: float = 0.0
    prune_group: int = 32
    row_scale: bool = False
    decay_steps: int = 0
    threshold_decay: float = 0.5
    group_size: int = 64
    row_length: int = 3
    max_rows: int = 192
    threshold_scale: str = "absolute"

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
        if self.prune_criterion not in PRUNE_CRITERIA:
            fail(f"prune_criterion={self.prune_criterion!r} is not one of {PRUNE_CRITERIA}")
        if not _finite_number(self.prune_fraction) or not 0 <= self.prune_fraction < 1:
            fail(f"prune_fraction={self.prune_fraction!r} must be in [0, 1)")
        if not _finite_number(self.prune_threshold) or self.prune_threshold < 0:
            fail(f"prune_threshold={self.prune_threshold!r} must be a finite number >= 0")
        if self.prune_criterion == "energy" and self.prune_threshold > 1:
            fail(f"prune_threshold={self.prune_threshold!r} is the share of L1 the 'energy' criterion keeps; "
                 "pass a number in [0, 1]")
        by_fraction = self.prune_criterion in ("sd_jax", "population")
        if by_fraction and self.prune_threshold:
            fail(f"prune_threshold={self.prune_threshold!r} is read by the 'value' and 'energy' criteria only, "
                 f"not by prune_criterion={self.prune_criterion!r}; set prune_fraction instead")
        if not by_fraction and self.prune_fraction:
            fail(f"prune_fraction={self.prune_fraction!r} is read by the 'sd_jax' and 'population' criteria "
                 f"only, not by prune_criterion={self.prune_criterion!r}; set prune_threshold instead")
        if not isinstance(self.prune_group, int) or self.prune_group < 1:
            fail(f"prune_group={self.prune_group!r} must be a positive integer (reference: 32)")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            fail(f"decay_steps={self.decay_steps!r} must be an integer >= 0 (0 turns decay off)")
        if not _finite_number(self.threshold_decay) or not 0 < self.threshold_decay < 1:
            fail(f"threshold_decay={self.threshold_decay!r} must be in (0, 1)")
        if self.threshold_scale not in THRESHOLD_SCALES:
            fail(f"threshold_scale={self.threshold_scale!r} is not one of {THRESHOLD_SCALES}")
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

    @property
    def prunes(self) -> bool:
        """Whether structural pruning is on (its criterion's number is not 0)."""
        return bool(self.prune_fraction or self.prune_threshold)

    def static_key(self) -> tuple:
        """Options that change the compiled computation (the rest are per-block arrays)."""
        return (self.iterations, self.pow2, self.row_scale, self.row_threshold > 0, self.decay_steps)


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


def structural_keep_rows(blocks: np.ndarray, spec: blocking.BlockSpec, fraction: float, group: int) -> np.ndarray:
    """Rows of C kept by the 'sd_jax' criterion, (n, m) bool, computed on the host.

    Per group of `group` output filters, the floor of `fraction` times the real rows, those with the
    smallest L1 norm (summed over the group's filters), is removed; padding rows are never counted or
    chosen.
    """
    real = blocking.real_rows(spec).reshape(-1)
    num_prune = int(math.floor(fraction * int(real.sum())))
    if num_prune == 0:
        return np.ones(spec.block_shape[:2], bool)
    per_output = np.asarray(blocks).reshape(spec.num_outputs, spec.blocks_per_output * spec.rows, spec.k)
    row_l1 = np.abs(per_output).sum(axis=-1)  # (outputs, rows of one output)
    groups = math.ceil(spec.num_outputs / group)
    padded = np.pad(row_l1, ((0, groups * group - spec.num_outputs), (0, 0)))
    group_l1 = np.where(real, padded.reshape(groups, group, -1).sum(axis=1), np.inf)
    rank = np.argsort(np.argsort(group_l1, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (rank >= num_prune) & real
    return np.repeat(keep, group, axis=0)[: spec.num_outputs].reshape(spec.block_shape[:2])


def reference_pruned_count(group_l1: np.ndarray, share: float) -> int:
    """How many units the authors' 'energy' criterion removes from a group.

    Their loop walks the units from the last to the first in their flattened order (not by size),
    adding each unit's L1 until the sum reaches `share` of the group's total; the index where it stops
    is the count, and that many units, the smallest, are removed. Sums run in float32 one term at a
    time, as theirs; a group of zeros loses nothing.
    """
    group_l1 = np.asarray(group_l1, np.float32)
    tail = np.cumsum(group_l1[::-1])[::-1]  # tail[e] = group_l1[e] + ... + group_l1[-1], summed from the end
    total = np.cumsum(group_l1)[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        reached = np.nonzero(tail / total >= np.float32(share))[0]
    return int(reached.max()) if reached.size else 0


def reference_pruned_units(group_l1: np.ndarray, criterion: str, amount: float) -> np.ndarray:
    """Units (kernel rows or input channels) of one group of filters the authors' rule removes, bool.

    group_l1: (units,) L1 norm of each unit summed over the group's filters, in the authors' order.
    criterion 'population': the ceiling of amount * units, smallest first; 'value': units whose L1 is
    below amount; 'energy': `reference_pruned_count` units, smallest first. Ties go to the earlier unit.
    """
    group_l1 = np.asarray(group_l1, np.float32)
    if criterion == "value":
        return group_l1 < amount
    if criterion == "population":
        count = math.ceil(group_l1.size * float(amount))
    elif criterion == "energy":
        count = reference_pruned_count(group_l1, amount)
    else:
        raise ValueError(f"criterion {criterion!r} is not one of the authors' 'population', 'value', 'energy'")
    pruned = np.zeros(group_l1.shape, bool)
    pruned[np.argsort(group_l1, kind="stable")[:count]] = True
    return pruned


def structural_keep(weight: np.ndarray, spec: blocking.BlockSpec, options: DecomposeOptions) -> np.ndarray:
    """Entries of the blocks that structural pruning keeps, (n, m, k) bool, computed on the host.

    'sd_jax' keeps whole rows of C (`structural_keep_rows`). The authors' criteria work on the weight:
    a k x k or depthwise kernel's units are its kernel rows (input channel, kernel row), channel-major
    as their (cout, cin, kh, kw) weight flattens them; a 1 x 1 kernel's units are single input
    channels, which the dense blocking spreads over rows of `row_length` inputs, so there C·B is only
    fitted to a zero and need not be exactly zero (as theirs); dense layers are never pruned.
    """
    if not options.prunes:
        return np.ones(spec.block_shape, bool)
    if options.prune_criterion == "sd_jax":
        rows = structural_keep_rows(blocking.to_blocks(weight, spec), spec, options.prune_fraction,
                                    options.prune_group)
        return np.broadcast_to(rows[..., None], spec.block_shape)
    if spec.kind == "dense":
        return np.ones(spec.block_shape, bool)
    kh, kw, cin, cout = spec.shape
    magnitude = np.abs(np.asarray(weight, np.float32))
    if kh * kw == 1:
        unit_l1 = magnitude.reshape(cin, cout).T  # (cout, input channels)
    else:
        unit_l1 = np.transpose(magnitude.sum(axis=1), (2, 1, 0)).reshape(cout, cin * kh)  # (cout, (cin, kh))
    unit_l1 = np.ascontiguousarray(unit_l1)  # group sums then add filter after filter, as theirs
    amount = options.prune_fraction if options.prune_criterion == "population" else options.prune_threshold
    keep_units = np.ones(unit_l1.shape, bool)
    for start in range(0, cout, options.prune_group):
        group_l1 = unit_l1[start:start + options.prune_group].sum(axis=0)
        keep_units[start:start + options.prune_group] = ~reference_pruned_units(
            group_l1, options.prune_criterion, amount)
    if kh * kw == 1:
        keep = keep_units.T.reshape(spec.shape)
    else:
        keep = np.broadcast_to(np.transpose(keep_units.reshape(cout, cin, kh), (2, 1, 0))[:, None], spec.shape)
    return blocking.to_blocks(np.ascontiguousarray(keep), spec)


def _sparsify(c, threshold, row_threshold, threshold_decay, use_row_rule, decay_steps):
    """Step 4 on C^T (n, k, m): the optional row rule, then the (decayed) element threshold.

    Structurally pruned rows need no mask here: A is zero there, so C^T = X A^T is exactly zero too
    (pruned single entries, the 1 x 1 input channels of the authors' rule, are only fitted to zero).
    """
    if use_row_rule:
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


LOSSY_ENERGY = 0.5  # share of the squared norm whose loss draws a LossyDecompositionWarning
PASS_BYTES = 1 << 20  # blocks per pass sized so their A stays in cache (about 2x faster than all)
ROUNDS_PER_PASS = 4
MAX_GROUPS = 8

_STATIC = ("iterations", "use_pow2", "use_row_scale", "use_row_rule", "decay_steps")


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _schedule(n: int, m: int, k: int) -> tuple[int, int]:
    """(independent groups, blocks per pass) for this backend.

    On CPU, one group per core (XLA runs independent loops on separate threads) and cache-sized
    passes; accelerators get one group and the whole batch per pass.
    """
    if jax.default_backend() != "cpu":
        return 1, n
    groups = max(1, min(_cores(), MAX_GROUPS, n))
    per_group = -(-n // groups)
    return groups, max(1, min(per_group, 2 ** int(math.log2(max(1, PASS_BYTES // (4 * m * k))))))


@functools.partial(jax.jit, static_argnames=_STATIC)
def decompose_blocks(
    blocks: Array,
    keep: Array,
    threshold: Array,
    max_coeff: Array,
    row_threshold: Array,
    threshold_decay: Array,
    *,
    iterations: int,
    use_pow2: bool = True,
    use_row_scale: bool = False,
    use_row_rule: bool = False,
    decay_steps: int = 0,
) -> dict[str, Array]:
    """The batched alternating least squares on blocks (n, m, k) with per-block options (n,).

    keep (n, m, k) bool: the entries structural pruning keeps (`structural_keep`); A is zero elsewhere.

    Returns coeff (n, m, k), basis (n, k, k), row_scale (n, m, 1) (ones when off) and the number of
    rounds each block ran, iterations (n,).

    Work is compacted: each pass gathers up to a cache-sized set of unfinished blocks, runs
    ROUNDS_PER_PASS rounds on them and scatters them back, so converged blocks cost nothing and a few
    slow blocks do not hold the rest back. On CPU the blocks are split into one independent group
    per core. Internally blocks are transposed to (n, k, m).
    """
    n, m, k = blocks.shape
    groups, per_pass = _schedule(n, m, k)
    padded = -(-n // groups) * groups  # zero blocks pad the last group; they finish in two rounds
    pad = lambda x: jnp.pad(jnp.asarray(x), [(0, padded - n)] + [(0, 0)] * (jnp.ndim(x) - 1))
    a = jnp.where(jnp.swapaxes(pad(keep), 1, 2), jnp.swapaxes(pad(blocks), 1, 2), 0.0)  # A^T: (padded, k, m)
    # The rounds run on A / s, s the power of two at or below each block's largest |A|: B comes out
    # as B / s and C unchanged (exactly: a power-of-two scale commutes with every float32 step), so
    # the Gram matrices of B neither overflow nor underflow at any weight scale. C starts from A.
    scale = _block_pow2_scale(a)
    options = dict(
        threshold=threshold, max_coeff=max_coeff, row_threshold=row_threshold, threshold_decay=threshold_decay
    )
    options = {key: pad(jnp.asarray(value, a.dtype)).reshape(padded, 1, 1) for key, value in options.items()}
    rules = dict(iterations=iterations, use_pow2=use_pow2, use_row_scale=use_row_scale,
                 use_row_rule=use_row_rule, decay_steps=decay_steps)
    split = lambda x: jnp.split(x, groups)
    results = [
        _als_compacted(a_group, scale_group, dict(zip(options, option_group)), per_pass, rules)
        for a_group, scale_group, *option_group in zip(split(a), split(scale), *map(split, options.values()))
    ]
    c = jnp.concatenate([c for c, _ in results])[:n]
    rounds = jnp.concatenate([r for _, r in results])[:n]
    cq, row_scale = _round(c, options["max_coeff"][:n], use_pow2, use_row_scale)
    basis = lstsq(cq if row_scale is None else cq * row_scale, a[:n] / scale[:n]) * scale[:n]
    row_scale = jnp.ones((n, 1, m), cq.dtype) if row_scale is None else row_scale
    return dict(coeff=jnp.swapaxes(cq, 1, 2), basis=basis, row_scale=jnp.swapaxes(row_scale, 1, 2), iterations=rounds)


def _block_pow2_scale(a: Array) -> Array:
    """(n, 1, 1): the power of two at or below each block's largest |entry| (1 for a zero block)."""
    largest = jnp.max(jnp.abs(a), axis=(1, 2), keepdims=True)
    _, exponent = jnp.frexp(largest)  # largest = mantissa * 2^exponent, mantissa in [0.5, 1)
    return jnp.where(largest > 0, jnp.ldexp(jnp.ones_like(largest), exponent - 1), 1.0)


def _als_compacted(a, scale, options, per_pass, rules):
    """Run every block of A^T (n, k, m) to convergence in compacted passes -> (C^T, rounds).

    scale (n, 1, 1): the power of two the rounds divide A by (see `decompose_blocks`).
    """
    n = a.shape[0]
    # One extra, permanently finished block at index n absorbs the unused slots of a pass.
    extend = lambda x: jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
    c = _sparsify(extend(a), extend(options["threshold"]), extend(options["row_threshold"]),
                  extend(options["threshold_decay"]), rules["use_row_rule"], rules["decay_steps"])
    a = extend(a / scale)
    options = {key: extend(value) for key, value in options.items()}

    def one_pass(state):
        index = jnp.nonzero(~state[2], size=per_pass, fill_value=n)[0]
        picked = tuple(x[index] for x in state)
        inputs = (a[index], {key: value[index] for key, value in options.items()})
        picked = jax.lax.fori_loop(0, ROUNDS_PER_PASS, lambda _, s: _als_round(s, *inputs, **rules), picked)
        return tuple(x.at[index].set(y) for x, y in zip(state, picked))

    done = jnp.zeros((n + 1,), bool).at[n].set(True)
    state = (c, jnp.zeros_like(a), done, jnp.zeros((n + 1,), jnp.int32))
    c, _, _, rounds = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), one_pass, state)
    return c[:n], rounds[:n]


def _als_round(state, a, options, *, iterations, use_pow2, use_row_scale, use_row_rule, decay_steps):
    """One ALS round on transposed blocks; a block stops when its rounded C repeats or at `iterations`."""
    c, previous, done, rounds = state
    k = a.shape[1]
    cq, scale = _round(c, options["max_coeff"], use_pow2, use_row_scale)
    cq = cq if scale is None else cq * scale
    repeated = jnp.all(cq == previous, axis=(1, 2)) & (rounds > 0)
    done = done | repeated | (rounds >= iterations)
    basis = lstsq(cq, a)  # step 2: B = argmin ||Cq B - A||
    # Step 3: C B = A  <=>  B^T C^T = A^T; the columns of B^T are the rows of B.
    inverse = lstsq(basis, jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), basis.shape))  # C^T = X A^T
    c_new = sum(inverse[:, :, i, None] * a[:, None, i, :] for i in range(k))
    c_new = _sparsify(c_new, options["threshold"], options["row_threshold"], options["threshold_decay"],
                      use_row_rule, decay_steps)
    frozen = done[:, None, None]
    return (jnp.where(frozen, c, c_new), jnp.where(frozen, previous, cq), done, rounds + (~done).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_segments",))
def _decompose_bucket(blocks, keep, threshold, max_coeff, row_threshold, threshold_decay, real, segment, *,
                      num_segments, **static):
    """`decompose_blocks` and the per-tensor `tensor_statistics` of a bucket, in one compilation.

    real (n, m, k): the entries that are weights; segment (n,) names each block's tensor. Returns
    `decompose_blocks`'s arrays and the statistics.
    """
    out = decompose_blocks.__wrapped__(blocks, keep, threshold, max_coeff, row_threshold, threshold_decay, **static)
    stats = tensor_statistics(blocks, out["coeff"], out["basis"], out["row_scale"], real, segment, num_segments)
    return out, stats


# Compiled bucket programs kept before the cache is dropped: each holds about 370 memory maps on CPU, and
# Linux's default limit of 65530 maps a process ended sweeps over many (m, k) shapes after about 175
# programs with "LLVM compilation error: Cannot allocate memory".
MAX_COMPILED = 64
# Bucket programs compile concurrently but run one at a time: two running at once from a thread pool
# once hung for good on XLA:CPU (both threads waiting in device_get, 0 % CPU; 2026-12-01, 2 cores).
_RUNNING = threading.Lock()


def padded_size(count: int) -> int:
    """The compiled size for `count` blocks or tensors: up to 16 as the next power of two, above that
    rounded up to a multiple of an eighth of its power of two (at most 12.5 % padding).

    Every distinct size is one compilation (at most `MAX_COMPILED` are kept); with at most 8 sizes per
    octave, sweeps over many shapes compile few programs, and the padding costs little time (zero
    padding blocks finish in two rounds and are dropped). Padding to the next power of two instead
    made the ResNet-18 decomposition 1.3x slower.
    """
    if count <= 16:
        return 1 << max(0, count - 1).bit_length()
    step = 1 << (count.bit_length() - 4)
    return -(-count // step) * step


def _pad_to(array: np.ndarray, size: int, mode: str = "constant") -> np.ndarray:
    """`array` padded along its first axis to `size` (zeros, or copies of its last entry for 'edge')."""
    return np.pad(array, [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1), mode=mode)


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One tensor to decompose: its name (for errors and reports), weight, kind and options."""

    name: str
    weight: Any
    kind: str
    options: DecomposeOptions


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A checked job: its weight divided by `unit` (see `threshold_unit`) and structural keep mask."""

    job: TensorJob
    options: DecomposeOptions
    spec: blocking.BlockSpec
    weight: np.ndarray
    keep: np.ndarray
    unit: float


def decompose_many(jobs: Sequence[TensorJob], *, min_sizes: Mapping[tuple, tuple[int, int]] | None = None
                   ) -> list[Decomposition]:
    """Decompose several tensors, batching all blocks with the same (m, k) and static options.

    Checks, structural pruning and blocking run on the host; the decomposition and the statistics of
    each bucket run in one compiled computation, its block and tensor counts padded to `padded_size`,
    or to `min_sizes[key]` (blocks, tensors) where larger (`compiled_sizes`: calls padded alike share
    their compiled programs). Warns (`LossyDecompositionWarning`) for every tensor that lost more than
    half of its energy.
    """
    prepared = []
    for job in jobs:
        options = job.options.validate(job.name)
        weight = _checked_weight(job.name, job.weight)
        spec = blocking.block_spec(
            weight.shape, job.kind, group_size=options.group_size, row_length=options.row_length,
            max_rows=options.max_rows, name=job.name,
        )
        unit = threshold_unit(weight, options)
        prepared.append(_Prepared(job, options, spec, weight / np.float32(unit), structural_keep(weight, spec, options),
                                  unit))

    buckets: dict[tuple, list[int]] = {}
    for index, part in enumerate(prepared):
        buckets.setdefault(_bucket_key(part.spec, part.options), []).append(index)
    min_sizes = min_sizes or {}
    if _decompose_bucket._cache_size() + len(buckets) > MAX_COMPILED:
        _decompose_bucket.clear_cache()

    def run(key: tuple, members: list[int]) -> list[tuple[int, Decomposition]]:
        parts = [prepared[i] for i in members]
        sizes = [part.spec.num_blocks for part in parts]
        least_blocks, least_tensors = min_sizes.get(key, (0, 0))
        total = max(padded_size(sum(sizes)), least_blocks)
        padded = lambda arrays, mode="constant": _pad_to(np.concatenate(arrays), total, mode)
        per_block = lambda field: padded([np.full(size, getattr(part.options, field), np.float32)
                                          for part, size in zip(parts, sizes)], "edge")
        options0 = parts[0].options
        arrays = (
            padded([blocking.to_blocks(part.weight, part.spec) for part in parts]),
            padded([part.keep for part in parts]),
            per_block("threshold"), per_block("max_coeff"), per_block("row_threshold"),
            per_block("threshold_decay"),
            padded([blocking.to_blocks(np.ones(part.spec.shape, bool), part.spec) for part in parts]),
            np.repeat(np.arange(len(parts) + 1), sizes + [total - sum(sizes)]),  # padding: one more tensor
        )
        statics = dict(num_segments=max(padded_size(len(parts) + 1), least_tensors), iterations=options0.iterations,
                       use_pow2=options0.pow2, use_row_scale=options0.row_scale,
                       use_row_rule=options0.row_threshold > 0, decay_steps=options0.decay_steps)
        _decompose_bucket.lower(*arrays, **statics).compile()  # the call below finds it in JAX's cache
        with _RUNNING:
            out, stats = jax.device_get(_decompose_bucket(*arrays, **statics))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        done = []
        for j, part in enumerate(parts):
            piece = {key: value[starts[j]:starts[j + 1]] for key, value in out.items()}
            report = TensorReport.from_statistics(
                part.job.name, part.job.kind, part.spec, part.options,
                {key: value[j] for key, value in stats.items()}, rounds=int(piece["iterations"].max()),
            )
            done.append((members[j], Decomposition(
                basis=jnp.asarray(piece["basis"] * np.float32(part.unit)), coeff=jnp.asarray(piece["coeff"]),
                mask=jnp.asarray(piece["coeff"] != 0),
                row_scale=jnp.asarray(piece["row_scale"]) if part.options.row_scale else None,
                spec=part.spec, options=part.options, report=report,
            )))
        return done

    # Buckets run from a thread pool so their compilations (about 1-2 s each) overlap; they execute in turn.
    results: list[Decomposition | None] = [None] * len(prepared)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(buckets), _cores()) or 1) as pool:
        for done in pool.map(run, buckets.keys(), buckets.values()):
            for index, decomposition in done:
                results[index] = decomposition
    for part, decomposition in zip(prepared, results):
        _warn_if_lossy(decomposition.report, part.options, part.unit)
    return results


def _bucket_key(spec: blocking.BlockSpec, options: DecomposeOptions) -> tuple:
    return (spec.rows, spec.k) + options.static_key()


def compiled_sizes(jobs: Sequence[TensorJob]) -> dict[tuple, tuple[int, int]]:
    """{bucket: (blocks, tensors)}: the sizes `decompose_many(jobs)` compiles its buckets at (no work
    beyond blocking shapes). The larger of two job lists' sizes, passed to both calls as `min_sizes`,
    lets the second reuse the first's compiled programs."""
    counts: dict[tuple, list[int]] = {}
    for job in jobs:
        options = job.options.validate(job.name)
        spec = blocking.block_spec(np.shape(job.weight), job.kind, group_size=options.group_size,
                                   row_length=options.row_length, max_rows=options.max_rows, name=job.name)
        count = counts.setdefault(_bucket_key(spec, options), [0, 0])
        count[0] += spec.num_blocks
        count[1] += 1
    return {key: (padded_size(blocks), padded_size(tensors + 1)) for key, (blocks, tensors) in counts.items()}


def threshold_unit(weight: np.ndarray, options: DecomposeOptions) -> float:
    """The power of two the weight is divided by before decomposing (and B multiplied by after).

    'absolute': 1. 'layer': the power of two nearest the weight's RMS (1 for a zero weight), so the
    threshold and max_coeff count in units of the layer's scale and C stays powers of two.
    """
    rms = math.sqrt(float(np.mean(np.square(weight, dtype=np.float64))))
    if options.threshold_scale == "absolute" or rms == 0:
        return 1.0
    return 2.0 ** round(math.log2(rms))


def _warn_if_lossy(report: TensorReport, options: DecomposeOptions, unit: float) -> None:
    """Warn, naming the tensor, when its decomposition lost more than half of the weight's energy."""
    if report.rel_error**2 <= LOSSY_ENERGY:
        return
    advice = ("pass threshold_scale='layer' or a smaller threshold" if options.threshold_scale == "absolute"
              else "pass a smaller threshold")
    warnings.warn(
        f"{report.name}: the decomposition lost {report.rel_error**2:.0%} of the weight's energy "
        f"(rel_error {report.rel_error:.3g}, density {report.density:.3g}, threshold {options.threshold} "
        f"({options.threshold_scale}), weight unit {unit:.3g}); {advice}",
        LossyDecompositionWarning, stacklevel=3,
    )


class LossyDecompositionWarning(UserWarning):
    """A tensor's decomposition lost more than `LOSSY_ENERGY` of its energy (squared norm)."""


def _checked_weight(name: str, weight: Any) -> np.ndarray:
    try:
        array = np.asarray(weight)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: cannot read the weight as an array ({error}); pass a numeric array") from None
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name}: weight dtype {array.dtype} is not floating point; pass float weights")
    array = array.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(
            f"{name}: weight has {int((~finite).sum())} non-finite value(s) (NaN or inf); fix the checkpoint first"
        )
    return array


def decompose(
    weight: Any,
    *,
    kind: str,
    threshold: float = DecomposeOptions.threshold,
    max_coeff: float = DecomposeOptions.max_coeff,
    iterations: int = DecomposeOptions.iterations,
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
