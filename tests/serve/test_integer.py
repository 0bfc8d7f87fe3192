"""Integer-only SD inference: fixed-point numerics, the shift-and-add rebuild, the integer graph."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sd_jax import models
from sd_jax.models.resnet_cifar import CifarResNet
from sd_jax.nn.rules import SDRules
from sd_jax.serve import integer


def _exact(x: int, m0: int, shift: int) -> int:
    """round(x * m0 / 2^shift), halves away from zero, in Python integers."""
    magnitude = (abs(x) * m0 + (1 << (shift - 1))) >> shift
    return min(magnitude, 2**31 - 1) * (1 if x >= 0 else -1)


def test_multiply_by_quantized_multiplier_is_exact_for_every_shift():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-2**31, 2**31, 200), [0, 1, -1, 2**31 - 1, -2**31]]).astype(np.int32)
    multiply = jax.jit(integer.multiply_by_quantized_multiplier)
    for shift in (1, 17, 31, 32, 33, 40, 62):
        m0 = np.int32(rng.integers(2**30, 2**31))
        got = np.asarray(multiply(jnp.asarray(x), m0, np.int32(shift)))
        np.testing.assert_array_equal(got, [_exact(int(v), int(m0), shift) for v in x], err_msg=f"shift {shift}")


def test_requantization_is_within_one_step_of_the_float_product():
    rng = np.random.default_rng(1)
    real = rng.uniform(1e-6, 2.0, 64)
    m0, shift = integer.quantize_multiplier(real)
    assert np.all((m0 >= 2**30) & (m0 < 2**31 - 1 + 1))
    acc = rng.integers(-2**24, 2**24, (100, 64)).astype(np.int32)
    got = np.asarray(jax.jit(integer.multiply_by_quantized_multiplier)(jnp.asarray(acc), m0, shift), np.float64)
    assert np.max(np.abs(got - acc * real)) <= 1.0


def test_quantize_multiplier_refuses_a_zero_multiplier():
    with pytest.raises(ValueError, match="finite and > 0"):
        integer.quantize_multiplier([0.5, 0.0])


def test_shift_add_rebuild_equals_the_integer_product():
    rng = np.random.default_rng(2)
    sign = rng.integers(-1, 2, (5, 7, 3)).astype(np.int8)
    shift = rng.integers(0, 12, (5, 7, 3)).astype(np.int8)
    basis = rng.integers(-127, 128, (5, 3, 3)).astype(np.int8)
    coeff = sign.astype(np.int64) * (2 ** shift.astype(np.int64))  # C / 2^e_min as integers
    expected = np.einsum("nmk,nkj->nmj", coeff, basis.astype(np.int64))
    got = integer.shift_add_rebuild(jnp.asarray(sign), jnp.asarray(shift), jnp.asarray(basis))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_int32_accumulator_holds_the_worst_case_of_a_3x3x64_conv():
    # Every tap at the extremes (q - 128 = -128, w = -127): 128 * 127 * 576 = 9,363,456 < 2^31.
    reduction = 3 * 3 * 64
    assert integer.accumulator_bound(reduction, 0) == 128 * 127 * reduction < 2**31 - 1
    x = jnp.full((1, 3, 3, 64), -128, jnp.int8)
    w = jnp.full((3, 3, 64, 1), -127, jnp.int8)
    acc = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       preferred_element_type=jnp.int32)
    assert int(acc[0, 0, 0, 0]) == integer.accumulator_bound(reduction, 0)


def _random_variables(model, x):
    """Random variables of `model` in trained form, drawn in NumPy (an SD init compiles for seconds): C
    signed powers of two with a third zero, its mask, B, weights and biases, batch statistics."""
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "sd_coeff" in name:
            return np.where(rng.random(leaf.shape) < 1 / 3, 0.0, rng.choice([-1, 1], leaf.shape)
                            * 2.0 ** rng.integers(-6, 0, leaf.shape)).astype(np.float32)
        if "var" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return (rng.normal(size=leaf.shape) * 0.5).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    if "sd_mask" in variables:
        coeffs = traverse_util.flatten_dict(variables["sd_coeff"])
        variables["sd_mask"] = traverse_util.unflatten_dict({(*path[:-1], "mask"): c != 0 for path, c in coeffs.items()})
    return variables


def _float_ops(jaxpr) -> list[str]:
    """Primitives of `jaxpr` (sub-jaxprs included) that produce a non-integer value."""
    found = []
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                found += _float_ops(getattr(inner, "jaxpr", inner))
        found += [str(eqn.primitive) for var in eqn.outvars
                  if not (jnp.issubdtype(var.aval.dtype, jnp.integer) or var.aval.dtype == jnp.bool_)]
    return found


def test_mlp_integer_logits_are_close_to_float_and_integer_only(tmp_path):
    model = models.get("mlp", num_classes=5, sd=SDRules([("^head/dense$", {"skip": True})]), hidden=(24,))
    x = jax.random.normal(jax.random.key(1), (64, 4, 4, 1))
    variables = _random_variables(model, x)
    quantized = integer.quantize(model, variables, x)
    expected = np.asarray(model.apply(variables, x, train=False))
    apply = jax.jit(integer.IntegerModel.apply)  # the model is an argument: a loaded copy reuses the compilation
    got = np.asarray(apply(quantized, x))
    assert np.max(np.abs(got - expected)) < 0.05 * np.max(np.abs(expected))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.95
    q = quantized.quantize_input(x)
    assert q.dtype == jnp.uint8
    jaxpr = jax.make_jaxpr(quantized.integer_logits)(q)
    assert _float_ops(jaxpr.jaxpr) == []
    assert jaxpr.out_avals[0].dtype == jnp.int32
    assert "kernel" in quantized.params["head/dense"] and "sign" in quantized.params["hidden1/dense"]
    integer.save(quantized, tmp_path / "mlp.npz")
    np.testing.assert_array_equal(np.asarray(apply(integer.load(tmp_path / "mlp.npz"), x)), got)


def test_load_refuses_a_file_without_a_graph(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not an integer model"):
        integer.load(tmp_path / "other.npz")


@pytest.mark.slow
def test_resnet_integer_logits_are_close_to_float_and_integer_only():
    rules = SDRules()
    model = CifarResNet(depth=8, num_classes=4, conv=rules.conv_factory(), dense=rules.dense_factory())
    x = jax.random.normal(jax.random.key(2), (32, 8, 8, 3))
    variables = _random_variables(model, x)
    quantized = integer.quantize(model, variables, x)
    expected = np.asarray(model.apply(variables, x, train=False))
    got = np.asarray(jax.jit(quantized.apply)(x))
    assert np.max(np.abs(got - expected)) < 0.1 * np.max(np.abs(expected))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.9
    assert _float_ops(jax.make_jaxpr(quantized.integer_logits)(quantized.quantize_input(x)).jaxpr) == []
    sd_layer = quantized.params["stage1_block0/conv1"]
    assert {sd_layer[key].dtype for key in ("sign", "shift", "basis")} == {jnp.dtype(jnp.int8)}
    leaves = jax.tree_util.tree_leaves_with_path(quantized.params)
    floats = sorted(jax.tree_util.keystr(path) for path, leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.integer))
    assert floats == ["['input']['scale']", "['logits']['scale']"]


def test_unsupported_model_is_refused_naming_the_supported_ones():
    model = models.get("lenet5", num_classes=10, sd=True)
    with pytest.raises(ValueError, match="resnet20.*mlp"):
        integer.quantize(model, {}, jnp.zeros((2, 28, 28, 1)))
