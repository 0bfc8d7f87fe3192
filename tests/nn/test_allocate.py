"""Tests for sd_jax/nn/allocate.py: per-layer settings that meet a storage target."""
import ml_collections
import numpy as np
import pytest

from sd_jax import models
from sd_jax.core import report
from sd_jax.core.allocation import Target
from sd_jax.models.synthetic import he_normal_params
from sd_jax.nn import allocate, convert
from sd_jax.nn.rules import SDRules

# A coarse grid and few rounds keep the fast tests to one small compilation each.
COARSE = dict(thresholds=(0.125, 0.25, 0.5, 1.0, 2.0), prune_fractions=(0.0, 0.5))
RULES = SDRules(iterations=4)


def _params():
    rng = np.random.default_rng(0)
    he = lambda *shape: (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))).astype(np.float32)
    return {"conv": {"kernel": he(3, 3, 16, 16), "bias": np.zeros(16, np.float32)},
            "dense": {"kernel": he(64, 10), "bias": np.zeros(10, np.float32)}}


def _compression(params, rules):
    _, decomposition = convert.to_sd({"params": params}, rules)
    return report.totals(decomposition.reports, decomposition.dense_params)["compression"], decomposition


def test_the_achieved_compression_is_the_target_and_the_rules_reproduce_it(tmp_path):
    params = _params()
    found = allocate.allocate(params, RULES, Target(compression=6.0), **COARSE)
    achieved, decomposition = _compression(params, found.sd_rules(RULES))
    assert achieved == pytest.approx(6.0, rel=0.05)
    assert {choice.layer for choice in found.layers} == {"conv", "dense"}
    path = tmp_path / allocate.ALLOCATION_FILE
    found.write(str(path))
    again = _compression(params, SDRules(allocate.read_rules(str(path)), iterations=4))[1]
    for first, second in zip(decomposition.reports, again.reports):
        assert (first.name, first.nonzeros, first.storage_bits) == (second.name, second.nonzeros, second.storage_bits)


def test_a_byte_target_is_met():
    params = _params()
    found = allocate.allocate(params, RULES, Target(bytes=2500), **COARSE)
    achieved, decomposition = _compression(params, found.sd_rules(RULES))
    bits = report.totals(decomposition.reports, decomposition.dense_params)["storage_bits"]
    assert bits / 8 == pytest.approx(2500, rel=0.05)


@pytest.mark.parametrize("compression", [1.01, 1000.0])
def test_an_unreachable_target_says_the_reachable_range(compression):
    with pytest.raises(ValueError, match=r"out of reach: .* reaches compression [\d.]+x to [\d.]+x"):
        allocate.allocate(_params(), RULES, Target(compression=compression), **COARSE)


def test_the_config_target_keys_are_read_and_checked():
    sd = ml_collections.ConfigDict(dict(SDRules.option_defaults(), target_compression=8.0))
    config = ml_collections.ConfigDict(dict(sd=sd))
    assert SDRules.target_of(config) == Target(compression=8.0)
    SDRules.from_config(config)  # the target keys are not layer options
    config.sd.target_bytes = 1e6
    with pytest.raises(ValueError, match="set only one target"):
        SDRules.target_of(config)


def test_read_rules_names_a_bad_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not an allocation file"):
        allocate.read_rules(str(path))


# Layers measured on a sample of output channels can hold one more exponent in full than in the sample
# (one more bit per non-zero): VGG's 3x3x512x512 convolutions then miss the target (7.3x for 8x).
SAMPLE_EXPONENT_GAP = pytest.mark.xfail(reason="sampled layers gain an exponent in full; re-measure them", strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "mlp", "resnet20", "resnet56", "mobilenet_v2",
                                  pytest.param("vgg11", marks=SAMPLE_EXPONENT_GAP)])
def test_zoo_models_land_within_5_percent_of_the_target(name):
    """25-150 s a model on 2 loaded cores."""
    small = name in ("lenet5", "mlp")
    model = models.get(name, num_classes=10)
    params = he_normal_params(model, (1, 28, 28, 1) if small else (1, 32, 32, 3))
    rules = SDRules()
    found = allocate.allocate(params, rules, Target(compression=8.0))
    achieved, _ = _compression(params, found.sd_rules(rules))
    assert achieved == pytest.approx(8.0, rel=0.05)
