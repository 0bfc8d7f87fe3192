"""Blocking views: a weight tensor as a batch of (m x k) matrices A_b ~= C_b B_b (docs/method.md 1.1).

Layouts (Flax kernel layouts in, blocks of shape (n, m, k) out):
- "conv", kernel (kh, kw, cin, cout) with kh * kw > 1: for each output channel and each group of
  input channels, rows are (input channel, kernel row) pairs and the k = kw columns are kernel
  columns. Input channels are split into ceil(cin / group_size) equal groups (zero-padded when cin
  does not divide), so cin = 96 gives 2 groups of 48 rather than 64 + 32.
- "dense", kernel (din, dout), and "conv" with a 1 x 1 kernel (1, 1, cin, cout): each output unit's
  input vector is zero-padded and cut into rows of `row_length` values; rows are split evenly into
  blocks of at most `max_rows` rows (din = 2048, k = 3 gives 4 blocks of 171 rows, as the reference).
- "depthwise", kernel (kh, kw, 1, channels): one (kh x kw) block per channel.
`to_blocks` and `from_blocks` are exact inverses (padding is dropped on the way back). Both take
NumPy or JAX arrays and return the same kind, so host-side preparation compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

KINDS = ("conv", "dense", "depthwise")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of how one weight tensor maps to blocks; hashable, safe as a jit static."""

    kind: str  # requested kind: "conv", "dense" or "depthwise"
    layout: str  # "conv_rows", "dense_rows" or "depthwise"
    shape: tuple[int, ...]  # original weight shape
    num_outputs: int  # output channels / units; blocks are ordered output-major
    blocks_per_output: int  # input-channel groups (conv) or row splits (dense); 1 for depthwise
    rows: int  # m: rows per block
    k: int  # columns per block, and the basis size (k x k)
    inputs_per_block: int  # input channels per group (conv), or padded inputs per block (dense)

    @property
    def num_blocks(self) -> int:
        return self.num_outputs * self.blocks_per_output

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.num_blocks, self.rows, self.k)

    @property
    def size(self) -> int:
        """Number of real (unpadded) weight entries."""
        return math.prod(self.shape)


def block_spec(
    shape: tuple[int, ...],
    kind: str,
    *,
    group_size: int = 64,
    row_length: int = 3,
    max_rows: int = 192,
    name: str = "weight",
) -> BlockSpec:
    """The blocking of a weight of `shape` and `kind`; raises ValueError naming `name` if it cannot."""
    shape = tuple(int(d) for d in shape)
    if kind not in KINDS:
        raise ValueError(f"{name}: unknown kind {kind!r}; pass one of {KINDS}")
    for option, value in (("group_size", group_size), ("row_length", row_length), ("max_rows", max_rows)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {option}={value!r} must be a positive integer")
    if any(d < 1 for d in shape):
        raise ValueError(f"{name}: shape {shape} has an empty dimension; nothing to decompose")
    if kind == "dense":
        if len(shape) != 2:
            raise ValueError(f"{name}: kind 'dense' needs a (din, dout) kernel, got shape {shape}")
        return _dense_rows_spec(kind, shape, shape[0], shape[1], row_length, max_rows)
    if len(shape) != 4:
        raise ValueError(
            f"{name}: kind {kind!r} needs a rank-4 (kh, kw, cin, cout) kernel, got shape {shape}"
        )
    kh, kw, cin, cout = shape
    if kind == "depthwise":
        if cin != 1:
            raise ValueError(
                f"{name}: a depthwise kernel has shape (kh, kw, 1, channels), got {shape}; "
                "use kind='conv' for an ordinary convolution"
            )
        return BlockSpec(kind, "depthwise", shape, cout, 1, kh, kw, 1)
    if kh == 1 and kw == 1:
        return _dense_rows_spec(kind, shape, cin, cout, row_length, max_rows)
    groups = math.ceil(cin / group_size)
    per_group = math.ceil(cin / groups)
    return BlockSpec(kind, "conv_rows", shape, cout, groups, per_group * kh, kw, per_group)


def _dense_rows_spec(kind, shape, din, dout, row_length, max_rows) -> BlockSpec:
    total_rows = math.ceil(din / row_length)
    splits = math.ceil(total_rows / max_rows)
    rows = math.ceil(total_rows / splits)
    return BlockSpec(kind, "dense_rows", shape, dout, splits, rows, row_length, rows * row_length)


def _numpy_or_jax(array):
    return np if isinstance(array, np.ndarray) else jnp


def to_blocks(weight: Array, spec: BlockSpec) -> Array:
    """View `weight` as blocks of shape spec.block_shape (zero rows where the layout pads)."""
    if tuple(weight.shape) != spec.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the block spec {spec.shape}")
    xp = _numpy_or_jax(weight)
    if spec.layout == "depthwise":
        return xp.transpose(weight[:, :, 0, :], (2, 0, 1))  # (channels, kh, kw)
    if spec.layout == "dense_rows":
        din = spec.shape[-2]
        vectors = weight.reshape(din, spec.num_outputs).T  # (dout, din)
        padded = spec.blocks_per_output * spec.inputs_per_block
        vectors = xp.pad(vectors, ((0, 0), (0, padded - din)))
        return vectors.reshape(spec.block_shape)
    kh, kw, cin, cout = spec.shape
    per_output = xp.transpose(weight, (3, 2, 0, 1))  # (cout, cin, kh, kw)
    padded = spec.blocks_per_output * spec.inputs_per_block
    per_output = xp.pad(per_output, ((0, 0), (0, padded - cin), (0, 0), (0, 0)))
    return per_output.reshape(spec.block_shape)  # rows: (input channel, kernel row), channel-major


def from_blocks(blocks: Array, spec: BlockSpec) -> Array:
    """Inverse of `to_blocks`: reassemble a weight of spec.shape, dropping padding."""
    if tuple(blocks.shape[-3:]) != spec.block_shape:
        raise ValueError(f"blocks shape {tuple(blocks.shape)} does not match {spec.block_shape}")
    xp = _numpy_or_jax(blocks)
    if spec.layout == "depthwise":
        return xp.transpose(blocks, (1, 2, 0))[:, :, None, :]
    if spec.layout == "dense_rows":
        din = spec.shape[-2]
        vectors = blocks.reshape(spec.num_outputs, -1)[:, :din]
        return vectors.T.reshape(spec.shape)
    kh, kw, cin, cout = spec.shape
    per_output = blocks.reshape(cout, -1, kh, kw)[:, :cin]
    return xp.transpose(per_output, (2, 3, 1, 0))


def real_rows(spec: BlockSpec) -> np.ndarray:
    """Boolean (blocks_per_output, rows): True for rows that hold at least one real weight entry."""
    if spec.layout == "depthwise":
        return np.ones((1, spec.rows), bool)
    if spec.layout == "dense_rows":
        din = spec.shape[-2]
        first_input = np.arange(spec.blocks_per_output * spec.rows) * spec.k
        return (first_input < din).reshape(spec.blocks_per_output, spec.rows)
    kh, cin = spec.shape[0], spec.shape[2]
    channel = np.arange(spec.blocks_per_output * spec.inputs_per_block)
    real = np.repeat(channel < cin, kh)
    return real.reshape(spec.blocks_per_output, spec.rows)
