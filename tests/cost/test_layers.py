"""Tests for sd_jax/cost/layers.py: traced layer extraction and MAC counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.cost.layers import extract_layers, sd_stats


def _xla_macs(fn, *shapes):
    analysis = jax.jit(fn).lower(*[jnp.zeros(s) for s in shapes]).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"] / 2


class _One(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.layer(x)


@pytest.mark.parametrize("layer, input_shape, macs, effective_macs", [
    # 3x3 VALID, 6x6 -> 4x4, 2 -> 5 channels: 16 positions * 9 taps * 2 * 5; no padding, one count.
    (nn.Conv(5, (3, 3), padding="VALID"), (1, 6, 6, 2), 16 * 9 * 2 * 5, 16 * 9 * 2 * 5),
    # 3x3 SAME on 4x4: 16 * 9 taps; along one axis 4 * 3 - 2 pairs fall inside, so 10 * 10 of them.
    (nn.Conv(1, (3, 3), padding="SAME"), (1, 4, 4, 1), 16 * 9, 10 * 10),
    # 3x3 stride 2 SAME on 5x5, 2 -> 3 channels: 3x3 outputs; pads (1, 1), per axis 2 + 3 + 2 taps inside.
    (nn.Conv(3, (3, 3), strides=2, padding="SAME"), (1, 5, 5, 2), 9 * 9 * 2 * 3, 7 * 7 * 2 * 3),
    # 1-D causal, length 5, 3 taps: two zeros before the input, 1 + 2 of the 15 pairs fall on them.
    (nn.Conv(1, (3,), padding="CAUSAL"), (1, 5, 1), 15, 12),
    # circular padding wraps real values: every tap is work.
    (nn.Conv(1, (3, 3), padding="CIRCULAR"), (1, 4, 4, 1), 16 * 9, 16 * 9),
    (nn.Dense(7), (3, 11), 11 * 7, 11 * 7),
])
def test_macs_by_hand_with_and_without_padding_taps(layer, input_shape, macs, effective_macs):
    counted = extract_layers(_One(layer), input_shape).layers[0]
    assert (counted.macs, counted.effective_macs) == (macs, effective_macs)


@pytest.mark.parametrize("kernel, stride, padding, groups, dilation, side, cin, cout", [
    (3, 1, "SAME", 1, 1, 16, 8, 16), (3, 2, "SAME", 1, 1, 17, 8, 16), (1, 1, "VALID", 1, 1, 8, 32, 64),
    (7, 2, ((3, 3), (3, 3)), 1, 1, 32, 3, 8), (3, 1, "SAME", 16, 1, 12, 16, 16), (3, 1, "SAME", 4, 2, 12, 8, 8),
])
def test_effective_conv_macs_match_xla_cost_analysis(kernel, stride, padding, groups, dilation, side, cin, cout):
    layer = nn.Conv(cout, (kernel, kernel), strides=stride, padding=padding, feature_group_count=groups,
                    kernel_dilation=dilation, use_bias=False)
    net = extract_layers(_One(layer), (2, side, side, cin))
    shape = net.layers[0].kernel_shape
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding if isinstance(padding, str) else padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    expected = _xla_macs(conv, (2, side, side, cin), shape)
    assert net.layers[0].effective_macs * 2 == pytest.approx(expected, rel=0.01)


def test_dense_macs_match_xla_cost_analysis():
    net = extract_layers(_One(nn.Dense(37, use_bias=False)), (5, 123))
    assert net.layers[0].macs * 5 == pytest.approx(_xla_macs(lambda x, w: x @ w, (5, 123), (123, 37)), rel=0.01)


def test_resnet20_layers_are_found_by_tracing():
    net = extract_layers(models.get("resnet20", num_classes=10), (1, 32, 32, 3), train=False)
    names = [layer.name for layer in net.layers]
    assert names[0] == "stem/conv" and names[-1] == "head/dense" and len(names) == 19 + 1  # 19 convs (identity shortcuts), one dense
    assert {layer.kind for layer in net.layers} == {"conv", "dense"}
    assert net.other_params > 0
    # stem 32*32*27*16; six 3x3 convs of 2 359 296 per stage, the first of stages 2 and 3 half that; head 64*10:
    # the 40.55 M of published counts; the 3x3 taps on the zero border leave 36.96 M.
    assert sum(layer.macs for layer in net.layers) == 442_368 + 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296) + 640
    assert sum(layer.effective_macs for layer in net.layers) == 36_957_504


def test_imagenet_resnet50_macs_match_published_counts():
    net = extract_layers(models.get("resnet50_imagenet", num_classes=1000), (1, 224, 224, 3), train=False)
    # 4.09 G as torchvision and fvcore report it (stride in the 3x3 conv); 3.95 G without padding taps.
    assert sum(layer.macs for layer in net.layers) == 4_089_184_256
    assert sum(layer.effective_macs for layer in net.layers) == 3_948_251_904


def test_mobilenet_depthwise_layers_are_depthwise():
    net = extract_layers(models.get("mobilenet_v2", num_classes=10), (1, 32, 32, 3), train=False)
    depthwise = [layer for layer in net.layers if layer.kind == "depthwise"]
    assert depthwise and all(layer.groups == layer.kernel_shape[-1] for layer in depthwise)


def test_sd_stats_counts_nonzeros_and_distinct_magnitudes():
    coeff = np.zeros((2, 4, 3), np.float32)
    coeff[0, 0] = [1.0, -1.0, 0.5]
    coeff[1, 2, 1] = -4.0
    stats = sd_stats(coeff, (2, 3, 3))
    assert (stats.nonzeros, stats.distinct_magnitudes, stats.code_bits) == (4, 3, 3)
    assert stats.storage_bits == 4 * 3 + 24 + 32 * 18


def test_model_without_layers_raises():
    class NoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * 2

    with pytest.raises(ValueError, match="nothing to analyze"):
        extract_layers(NoLayers(), (1, 4))
