"""SD form of every zoo model (sd_jax/models/registry.py `sd=`): logits against the dense model.

What you train is what you serve: the SD model's logits equal the dense model's when the dense model
is given the kernels the SD layers rebuild (`sd_jax.nn.dense_variables`), for every registered model
on a small input, in eval and in train mode.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import models
from sd_jax.models.synthetic import synthetic_variables
from sd_jax.nn import SD_COLLECTIONS, dense_variables

# name -> small input; 32x32 where the model needs it (VGG's five pools, ImageNet stems).
INPUTS = {name: (2, 8, 8, 3) for name in models.names()}
INPUTS.update({name: (2, 32, 32, 3) for name in ("vgg11", "vgg16", "vgg19")})
INPUTS.update({name: (1, 32, 32, 3) for name in models.names() if name.endswith("_imagenet")})
INPUTS.update({"lenet5": (2, 28, 28, 1), "mlp": (2, 28, 28, 1), "transformer_lm": (2, 8)})

# The fast set covers each family once; the rest take several seconds each on 2 CPU cores.
FAST = ["lenet5", "mlp", "resnet20"]


def _num_classes(name):
    return 1000 if name.endswith("_imagenet") else 10


def _sd_matches_dense(name):
    num_classes = _num_classes(name)
    sd_model = models.get(name, num_classes=num_classes, sd=True)
    dense_model = models.get(name, num_classes=num_classes)
    x = jax.random.normal(jax.random.key(1), INPUTS[name])
    variables = synthetic_variables(sd_model, x)
    dense = dense_variables(sd_model, variables, x, train=False)
    assert not set(SD_COLLECTIONS) & set(dense)

    @jax.jit
    def logits(variables, dense, x):
        sd_train, sd_updates = sd_model.apply(variables, x, train=True, mutable=["batch_stats"])
        dense_train, dense_updates = dense_model.apply(dense, x, train=True, mutable=["batch_stats"])
        return (sd_model.apply(variables, x, train=False), dense_model.apply(dense, x, train=False),
                sd_train, dense_train, sd_updates, dense_updates)

    sd_eval, dense_eval, sd_train, dense_train, sd_updates, dense_updates = logits(variables, dense, x)
    assert sd_eval.shape == ((*x.shape, num_classes) if x.ndim == 2 else (x.shape[0], num_classes)) and bool(jnp.all(jnp.isfinite(sd_eval)))
    np.testing.assert_allclose(sd_eval, dense_eval, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sd_train, dense_train, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), sd_updates, dense_updates)


@pytest.mark.parametrize("name", FAST)
def test_sd_logits_equal_dense_logits_with_rebuilt_kernels(name):
    _sd_matches_dense(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(models.names()) - set(FAST)))
def test_sd_logits_equal_dense_logits_with_rebuilt_kernels_large(name):
    _sd_matches_dense(name)
