"""Tests for sd_jax/nn/rules.py: which layers become SD, with which options."""
import flax.linen as nn
import pytest

from sd_jax.core import pow2
from sd_jax.nn import SDConv, SDDense, SDRules


def test_defaults_select_2d_convs_and_dense_layers_and_leave_wide_or_1d_convs_dense():
    rules = SDRules(mode="pow2", threshold=4e-3)
    assert rules.select("block/conv", (3, 3)).threshold == 4e-3
    assert rules.select("head/dense", None).mode == "pow2"
    assert rules.select("stem/conv", (7, 7)) is None  # wider than max_kernel_size, as the reference
    assert rules.select("temporal/conv", (3,)) is None  # not 2-D


def test_first_matching_rule_wins_and_overrides_the_defaults():
    rules = SDRules([("^stem/conv$", {"skip": True}), ("stage3", {"threshold": 0.5, "kind": "depthwise"}),
                     ("stage", {"max_coeff": 8.0})], mode="pow2", threshold=0.25)
    assert rules.select("stem/conv", (3, 3)) is None
    stage3 = rules.select("stage3_block0/conv1", (3, 3))
    assert (stage3.threshold, stage3.max_coeff, stage3.kind) == (0.5, 32.0, "depthwise")
    stage1 = rules.select("stage1_block0/conv1", (3, 3))
    assert (stage1.threshold, stage1.max_coeff) == (0.25, 8.0)


def test_a_rule_naming_a_wide_conv_makes_it_sd():
    assert SDRules([("^stem/conv$", {})]).select("stem/conv", (7, 7)) is not None


def test_latent_layers_quantize_with_the_smallest_coefficient_of_the_threshold():
    assert SDRules(threshold=4e-3).select("a", None).threshold == pow2.min_coeff(4e-3) == 2.0**-8
    assert SDRules(threshold=4e-3, mode="pow2").select("a", None).threshold == 4e-3


def test_kernel_plan_carries_decomposition_and_shared_options_only():
    from sd_jax.core.decompose import DecomposeOptions

    rules = SDRules([("conv", {"prune_fraction": 0.5, "init_scheme": "he"})], threshold=2e-3, iterations=5)
    assert rules.kernel_plan("block/conv", (3, 3, 4, 8)) == (
        "conv", DecomposeOptions(threshold=2e-3, iterations=5, prune_fraction=0.5))
    assert rules.kernel_plan("head/dense", (8, 10))[0] == "dense"
    assert SDRules([("conv", {"skip": True})]).kernel_plan("block/conv", (3, 3, 4, 8)) is None


def test_one_rule_engine_for_training_and_decomposition():
    """A rule on a layer name ('^head/dense$') selects the same layer when building the model and when
    decomposing its variables (the core matched kernel paths before, so this rule matched nothing)."""
    import numpy as np

    from sd_jax.core.network import decompose_network

    rules = SDRules([("^head/dense$", {"skip": True}), ("^block/conv$", {"threshold": 0.05})])
    params = {"block/conv": {"kernel": np.full((3, 3, 4, 8), 0.1, np.float32)},
              "head/dense": {"kernel": np.full((8, 10), 0.1, np.float32)}}
    result = decompose_network(params, rules.planner())
    assert [r.name for r in result.reports] == ["block/conv/kernel"]
    assert result.tree["block/conv"]["kernel"].options.threshold == 0.05
    assert type(rules.dense_factory()(features=10, name="head/dense")) is nn.Dense


def test_from_config_reads_the_sd_section_and_defaults_live_in_the_dataclasses():
    import ml_collections

    from sd_jax.core.decompose import DecomposeOptions
    from sd_jax.nn.layers import SDOptions

    defaults = SDRules.option_defaults()
    assert defaults["threshold"] == SDOptions.threshold == DecomposeOptions.threshold
    assert defaults["max_coeff"] == SDOptions.max_coeff == DecomposeOptions.max_coeff
    assert defaults["rules"] == [] and "kind" not in defaults
    assert SDRules.option_types() == {"activation_bits": int, "gradient_bits": int, "stored_activation_bits": int}
    config = ml_collections.ConfigDict({"sd": dict(defaults, threshold=4e-3, max_kernel_size=7,
                                                   rules=[("^head/", {"skip": True})])})
    rules = SDRules.from_config(config)
    assert rules.max_kernel_size == 7 and rules.rules == (("^head/", {"skip": True}),)
    assert rules.kernel_plan("a", (8, 4))[1].threshold == 4e-3
    assert SDRules.from_config(ml_collections.ConfigDict()).defaults == {}
    config.sd.pow2 = True
    with pytest.raises(ValueError, match="'pow2' is not possible"):
        SDRules.from_config(config)


def test_as_section_is_read_back_by_from_config_and_survives_json():
    import json

    rules = SDRules([("^head/", {"skip": True}), ("conv1", {"mode": "pow2", "threshold": 1e-2})], max_kernel_size=5,
                    threshold=4e-3, activation_bits=8)
    back = SDRules.from_config({"sd": json.loads(json.dumps(rules.as_section()))})
    assert repr(back) == repr(rules)
    assert back.select("stage1/conv1", (3, 3)) == rules.select("stage1/conv1", (3, 3))


def test_factories_build_sd_or_dense_layers_by_name():
    rules = SDRules([("^head/dense$", {"skip": True})], mode="pow2")
    conv = rules.conv_factory()(features=4, kernel_size=(3, 3), name="block/conv")
    assert isinstance(conv, SDConv) and conv.mode == "pow2"
    assert type(rules.dense_factory()(features=10, name="head/dense")) is nn.Dense
    assert isinstance(rules.dense_factory()(features=10, name="hidden1/dense"), SDDense)


def test_rule_matching_no_layer_raises_value_error_naming_the_pattern():
    rules = SDRules([("^stem/conv$", {"skip": True}), ("stage9", {})])
    with pytest.raises(ValueError, match=r"\['stage9'\] match no layer"):
        rules.check_matches(["stem/conv", "stage1_block0/conv1"])


def test_rule_selecting_a_kernel_kind_sd_cannot_take_raises_value_error_naming_the_layer():
    with pytest.raises(ValueError, match="layer 'temporal/conv': a 1-D convolution"):
        SDRules([("temporal", {})]).select("temporal/conv", (3,))
    with pytest.raises(ValueError, match="layer 'head/dense': kind 'conv' is not possible for a dense layer"):
        SDRules([("head", {"kind": "conv"})]).select("head/dense", None)


@pytest.mark.parametrize("rules,defaults,message", [
    ([("conv", {"treshold": 1.0})], {}, "unknown option 'treshold'"),
    ([("conv", {"row_scale": True})], {}, "no per-row scale"),
    ([], {"pow2": False}, "power-of-two coefficients"),
    ([("(", {})], {}, "is not a valid regular expression"),
    (["conv"], {}, "is not a \\(pattern, options-dict\\) pair"),
    ([], {"mode": "float"}, "mode 'float' is not one of"),
    ([], {"prune_fraction": 1.5}, "prune_fraction=1.5 must be in"),
    ([], {"skip": True}, "'skip' belongs in a rule"),
])
def test_bad_rules_raise_value_error(rules, defaults, message):
    with pytest.raises(ValueError, match=message):
        SDRules(rules, **defaults)
