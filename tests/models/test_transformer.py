"""transformer_lm: layer names, dense and SD builds, causality and input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.models.transformer import sinusoidal_positions
from sd_jax.nn.rules import SDRules

TINY = dict(num_layers=2, width=16, heads=2, mlp_ratio=2, context=16)
EMBED_AND_HEAD_DENSE = [("^embed/dense$", {"skip": True}), ("^head/dense$", {"skip": True})]


def _init(model, tokens):
    return jax.jit(lambda key: model.init(key, tokens, train=False))(jax.random.key(0))


def test_layer_names_are_the_projections():
    names = models.layer_names(models.get("transformer_lm", num_classes=256, **TINY))
    assert names[0] == "embed/dense" and names[-1] == "head/dense"
    assert [n.split("/", 1)[1] for n in names if n.startswith("block1/")] == [
        "attention/query", "attention/key", "attention/value", "attention/out", "mlp/dense1", "mlp/dense2"]


def test_dense_and_sd_builds():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    dense = models.get("transformer_lm", num_classes=256, **TINY)
    logits = jax.eval_shape(lambda: dense.apply(dense.init(jax.random.key(0), tokens, train=False), tokens, train=False))
    assert logits.shape == (2, 12, 256)
    sd = models.get("transformer_lm", num_classes=256, sd=SDRules(EMBED_AND_HEAD_DENSE), **dict(TINY, num_layers=1))
    sd_variables = _init(sd, tokens)
    coeffs = sd_variables["sd_coeff"]
    assert set(coeffs) == {"block0"} and set(coeffs["block0"]["attention"]) == {"query", "key", "value", "out"}
    assert "kernel" in sd_variables["params"]["embed"]["dense"] and "kernel" in sd_variables["params"]["head"]["dense"]
    logits = jax.jit(lambda v, t: sd.apply(v, t, train=False))(sd_variables, tokens)
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_a_position_sees_only_earlier_tokens():
    model = models.get("transformer_lm", num_classes=256, **TINY)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 10)), jnp.int32)
    apply = jax.jit(lambda v, t: model.apply(v, t, train=False))
    variables = _init(model, tokens)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % 256)
    before, after = (apply(variables, t) for t in (tokens, changed))
    np.testing.assert_allclose(before[0, :6], after[0, :6], atol=1e-5)
    assert not np.allclose(before[0, 6:], after[0, 6:])


def test_sinusoidal_positions():
    table = sinusoidal_positions(5, 6)
    np.testing.assert_allclose(table[0], [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)


def test_input_longer_than_context_is_refused():
    model = models.get("transformer_lm", num_classes=256, **TINY)
    with pytest.raises(ValueError, match="context 16"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32), train=False))
