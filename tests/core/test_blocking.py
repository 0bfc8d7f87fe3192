import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sd_jax.core import blocking


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 150), st.integers(1, 9), st.sampled_from([16, 64]))
def test_conv_blocking_round_trips(kh, kw, cin, cout, group_size):
    shape = (kh, kw, cin, cout)
    spec = blocking.block_spec(shape, "conv", group_size=group_size)
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    blocks = blocking.to_blocks(weight, spec)
    assert blocks.shape == spec.block_shape
    np.testing.assert_array_equal(blocking.from_blocks(blocks, spec), weight)
    # Padding only adds zeros: the blocks hold exactly the weight's entries.
    assert float(np.abs(blocks).sum()) == pytest.approx(float(np.abs(weight).sum()), rel=1e-5)


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 3000), st.integers(1, 7), st.sampled_from([2, 3, 4]), st.sampled_from([50, 192]))
def test_dense_blocking_round_trips(din, dout, row_length, max_rows):
    spec = blocking.block_spec((din, dout), "dense", row_length=row_length, max_rows=max_rows)
    weight = np.random.default_rng(1).normal(size=(din, dout)).astype(np.float32)
    blocks = blocking.to_blocks(weight, spec)
    assert blocks.shape[1] <= max_rows and blocks.shape[2] == row_length
    np.testing.assert_array_equal(blocking.from_blocks(blocks, spec), weight)
    assert int(blocking.real_rows(spec).sum()) == -(-din // row_length)


@settings(deadline=None, max_examples=20)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 20))
def test_depthwise_blocking_round_trips(kh, kw, channels):
    spec = blocking.block_spec((kh, kw, 1, channels), "depthwise")
    weight = np.random.default_rng(2).normal(size=(kh, kw, 1, channels)).astype(np.float32)
    blocks = blocking.to_blocks(weight, spec)
    assert blocks.shape == (channels, kh, kw)
    np.testing.assert_array_equal(blocks[3 % channels], weight[:, :, 0, 3 % channels])
    np.testing.assert_array_equal(blocking.from_blocks(blocks, spec), weight)


def test_reference_layouts():
    # A 3x3 conv with cin = 256 has 4 blocks of 192 x 3 per output channel.
    assert blocking.block_spec((3, 3, 256, 8), "conv").block_shape == (32, 192, 3)
    # Dense lengths 64 ... 2048 give the reference's (splits x rows).
    expected = {64: (1, 22), 128: (1, 43), 256: (1, 86), 512: (1, 171), 1024: (2, 171), 2048: (4, 171)}
    for din, (splits, rows) in expected.items():
        spec = blocking.block_spec((din, 10), "dense")
        assert (spec.blocks_per_output, spec.rows) == (splits, rows)
    # A 1x1 conv uses the dense layout; uneven channel counts split into equal groups.
    assert blocking.block_spec((1, 1, 2048, 4), "conv").layout == "dense_rows"
    assert blocking.block_spec((3, 3, 96, 4), "conv").inputs_per_block == 48


def test_conv_block_rows_are_input_channel_then_kernel_row():
    weight = np.arange(3 * 3 * 2 * 1, dtype=np.float32).reshape(3, 3, 2, 1)
    spec = blocking.block_spec(weight.shape, "conv")
    blocks = np.asarray(blocking.to_blocks(weight, spec))
    np.testing.assert_array_equal(blocks[0, 0], weight[0, :, 0, 0])  # channel 0, kernel row 0
    np.testing.assert_array_equal(blocks[0, 1], weight[1, :, 0, 0])  # channel 0, kernel row 1
    np.testing.assert_array_equal(blocks[0, 3], weight[0, :, 1, 0])  # channel 1, kernel row 0


@pytest.mark.parametrize(
    "shape, kind, message",
    [((3, 3, 4), "conv", "rank-4"), ((3, 3, 2, 4), "depthwise", "depthwise kernel"),
     ((3, 3, 2, 4), "dense", "dense"), ((4, 4), "lstm", "unknown kind"), ((0, 4), "dense", "empty")],
)
def test_bad_shapes_and_kinds_raise(shape, kind, message):
    with pytest.raises(ValueError, match=message) as info:
        blocking.block_spec(shape, kind, name="layer7/kernel")
    assert "layer7/kernel" in str(info.value)


def test_block_spec_is_a_valid_jit_static():
    spec = blocking.block_spec((3, 3, 8, 4), "conv")
    weight = np.ones((3, 3, 8, 4), np.float32)
    f = jax.jit(blocking.to_blocks, static_argnums=1)
    assert f(weight, spec).shape == spec.block_shape
