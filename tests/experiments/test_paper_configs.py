import itertools

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from experiments.configs import paper
from sd_jax import data, models
from sd_jax.train import trainer
from sd_jax.train.optimizer import sd_optimizer

ROWS = [(d, m, s) for d in ("cifar10", "cifar100") for m, s in itertools.product(paper.CIFAR_MODELS, paper.SETTINGS)]
ROWS += [("imagenet2012", m, s) for m, s in itertools.product(paper.IMAGENET_MODELS, paper.IMAGENET_SETTINGS)]
FAST = [row for row in ROWS if row[1] in ("resnet20", "resnet18") and row[0] != "cifar100"]


def _build(dataset, model, setting):
    """Parse the config and build its data pipeline, model and optimizer at a tiny size."""
    config = paper.get_config(f"{dataset},{model},{setting}")
    with tfds.testing.mock_data(num_examples=200):
        pipeline = data.input_pipeline(config.input.dataset, "train", batch_size=4, seed=0,
                                       setting=config.input.setting, part=config.input.part, image_size=32)
        batch = next(pipeline)
    sd = trainer._sd_rules(config) if config.model.sd else False
    net = models.get(config.model.name, num_classes=pipeline.num_classes, sd=sd, **config.model.options.to_dict())
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    optimizer = sd_optimizer(0.1, coeff_update=config.optim.coeff_update, threshold=config.sd.threshold)
    jax.eval_shape(optimizer.init, {k: v for k, v in variables.items() if k in ("params", "sd_basis", "sd_coeff")})
    assert batch["image"].shape[0] == 4
    assert ("sd_coeff" in variables) == bool(config.model.sd)


@pytest.mark.parametrize("row", FAST, ids=",".join)
def test_paper_configs_build(row):
    _build(*row)


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r in ROWS if r not in FAST], ids=",".join)
def test_every_paper_config_builds(row):
    _build(*row)


@pytest.mark.parametrize("arg, message", [("cifar10,resnet20", "dataset,model,setting"),
                                          ("svhn,resnet20,dense", "dataset"),
                                          ("imagenet2012,resnet20,dense", "not in the paper"),
                                          ("cifar10,resnet20,pruned", "setting"),
                                          ("imagenet2012,resnet50,adaptation", "setting")])
def test_bad_config_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        paper.get_config(arg)


def test_sd_from_scratch_trains_a_latent_coefficient_with_8_bit_numerics():
    config = paper.get_config("cifar10,resnet20,sd_8bit")
    assert (config.optim.coeff_update, config.sd.mode) == ("latent", "latent")
    assert (config.sd.activation_bits, config.sd.gradient_bits) == (8, 8)


@pytest.mark.parametrize("setting", ["inference_only", "adaptation", "finetune"])
def test_decomposed_settings_use_the_measured_bucket_switch(setting):
    config = paper.get_config(f"cifar10,resnet20,{setting}")
    assert (config.sd.threshold, config.optim.switch_bar, config.optim.weight_decay) == (0.03, 200, 0.0)


@pytest.mark.parametrize("setting", paper.SETTINGS)
def test_fashion_mnist_configs_build(setting):
    from experiments.configs import fashion_mnist

    config = fashion_mnist.get_config(f"lenet5,{setting}")
    assert config.input.dataset == "fashion_mnist_idx" and config.model.sd == (setting != "dense")
    with tfds.testing.mock_data(num_examples=64):
        pipeline = data.input_pipeline(config.input.dataset, "train", batch_size=4, seed=0,
                                       setting=config.input.setting, part=config.input.part)
        batch = next(pipeline)
    sd = trainer._sd_rules(config) if config.model.sd else False
    net = models.get(config.model.name, num_classes=pipeline.num_classes, sd=sd)
    jax.eval_shape(lambda: net.init(jax.random.key(0), batch["image"], train=False))
    with pytest.raises(ValueError, match="model,setting"):
        fashion_mnist.get_config("lenet5")


def test_data_dir_is_one_value_at_the_top_and_in_input():
    config = paper.get_config("cifar10_jpeg,resnet20,sd_8bit")
    config.data_dir = "/prepared"
    assert config.input.data_dir == "/prepared"


def test_sd_from_scratch_without_batch_norm_takes_a_lower_learning_rate():
    from experiments.configs import fashion_mnist

    assert fashion_mnist.get_config("lenet5,sd_8bit").optim.lr == 0.01
    assert fashion_mnist.get_config("resnet20,sd_8bit").optim.lr == 0.1
