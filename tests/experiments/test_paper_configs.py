import itertools
import warnings

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from experiments.configs import paper
from sd_jax import data
from sd_jax.nn.rules import SDRules
from sd_jax.train import trainer
from sd_jax.train.optimizer import sd_optimizer

ROWS = [(d, m, s) for d in ("cifar10", "cifar100") for m, s in itertools.product(paper.CIFAR_MODELS, paper.SETTINGS)]
ROWS += [("imagenet2012", m, s) for m, s in itertools.product(paper.IMAGENET_MODELS, paper.IMAGENET_SETTINGS)]
FAST = [row for row in ROWS if row[1] in ("resnet20", "resnet18") and row[0] != "cifar100"]


def _build(dataset, model, setting):
    """Parse the config and build its data pipeline, model and optimizer at a tiny size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # models the authors never ran
        config = paper.get_config(f"{dataset},{model},{setting}")
    with tfds.testing.mock_data(num_examples=200):
        pipeline = data.input_pipeline(config.input.dataset, "train", batch_size=4, seed=0,
                                       setting=config.input.setting, part=config.input.part,
                                       split_rule=config.input.split_rule, image_size=32)
        batch = next(pipeline)
    net = trainer._model(config, pipeline.num_classes, SDRules.from_config(config))
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


# The authors' defaults, read from VITA-Group/SmartDeal (SmartDeal-Training/main.py argparse and code,
# SmartDeal-Inference/main.py for inference-only). A change to paper.REFERENCE must fail here.
AUTHORS = dict(
    lr=0.1, batch_size=128, epochs=200, momentum=0.9, weight_decay=5e-4, imagenet_weight_decay=1e-4,
    schedule="reference", threshold=4e-3, switch_bar=1, update_threshold=0.0, init_scheme="reference",
    reset_counters_every_epoch=True, revive_at="ceil", swa_start_epoch=161, swa_lr=0.05,
    inference_only_lr=0.05, inference_only_epochs=300, inference_only_threshold=1e-3, inference_only_max_coeff=32.0,
    decompose_iterations=30, threshold_decay=0.5,
    # SmartDeal-Inference/main.py: `lr = args.lr * (0.5 ** (epoch // 30))`; utils.moving_average after every
    # epoch from the first (swa_n = 0); smart_net(model) and smart_net(swa_model) after every epoch
    inference_only_schedule="step", inference_only_step_epochs=30, inference_only_step_factor=0.5,
    inference_only_swa_start_epoch=1, inference_only_project_every_epoch=True,
    activation_range="batch", range_momentum=0.1,
    split_rule="reference",  # main.py --task adapt|finetune: np.random.seed(0) splits, labels kept
)


def test_reference_recipe_is_pinned_to_the_authors_defaults():
    assert paper.REFERENCE == AUTHORS


def _reference(setting, dataset="cifar10", model="resnet18"):
    return paper.get_config(f"{dataset},{model},{setting},reference")


@pytest.mark.parametrize("setting", ["dense", "sd_scratch", "sd_bucket_switch"])
def test_reference_recipe_trains_with_the_authors_optimizer_and_schedule(setting):
    config = _reference(setting)
    optim = config.optim
    assert (optim.lr, optim.epochs, optim.momentum, optim.weight_decay, optim.schedule) == (0.1, 200, 0.9, 5e-4, "reference")
    assert config.input.batch_size == 128 and config.recipe == "reference" and config.setting == setting
    assert _reference(setting, "imagenet2012").optim.weight_decay == 1e-4


def test_reference_sd_from_scratch_is_a_latent_c_at_threshold_4e_3_with_the_authors_draw():
    config = _reference("sd_scratch")
    assert (config.sd.mode, config.optim.coeff_update, config.sd.threshold) == ("latent", "latent", 4e-3)
    assert config.sd.init_scheme == "reference" and config.sd.activation_bits is None


def test_reference_bucket_switch_follows_the_authors_rule():
    optim = _reference("sd_bucket_switch").optim
    assert (optim.coeff_update, optim.switch_bar, optim.update_threshold) == ("bucket_switch", 1, 0.0)
    assert optim.reset_counters_every_epoch and optim.revive_at == "ceil"


def test_reference_inference_only_uses_the_authors_inference_defaults():
    config = _reference("inference_only")
    assert (config.optim.lr, config.optim.epochs, config.sd.threshold, config.sd.max_coeff) == (0.05, 300, 1e-3, 32.0)
    assert config.sd.iterations == 30 and config.optim.weight_decay == 5e-4 and config.optim.momentum == 0.9


def test_reference_inference_only_trains_dense_projected_every_epoch_with_swa_and_the_step_schedule():
    config = _reference("inference_only")
    assert not config.model.sd and config.optim.project_every_epoch
    assert (config.optim.schedule, config.optim.step_epochs, config.optim.step_factor) == ("step", 30, 0.5)
    assert (config.swa.start_epoch, config.swa.bn_batches, config.eval.every_steps) == (1, 0, 0)
    assert not any("re-decompose" in note or "every 30 epochs" in note for note in config.departures)
    schedule = trainer._schedule(config, steps_per_epoch=391)
    assert [float(schedule(epoch * 391)) for epoch in (0, 29, 30, 60, 299)] == pytest.approx(
        [0.05, 0.05, 0.025, 0.0125, 0.05 / 2**9])
    tuned = paper.get_config("cifar10,resnet18,inference_only,tuned")  # decomposed once, then fine-tuned in SD form
    assert tuned.model.sd and not tuned.optim.project_every_epoch and tuned.optim.schedule == "reference"
    assert (tuned.optim.lr, tuned.optim.epochs, tuned.swa.start_epoch) == (0.01, 40, 0)


def test_reference_adaptation_and_finetune_use_the_authors_splits():
    for setting in ("adaptation", "finetune"):
        config = _reference(setting)
        assert config.input.split_rule == "reference" and config.input.part == "target"
        assert not any("split" in note for note in config.departures)
        assert paper.get_config(f"cifar10,resnet18,{setting},tuned").input.split_rule == "sd_jax"
    assert _reference("sd_scratch").input.split_rule == "sd_jax"  # no split to draw
    config = _reference("adaptation")
    config.input.batch_size = config.input.eval_batch_size = 4
    with tfds.testing.mock_data(num_examples=200):
        train, evaluation = trainer._pipelines(config)
    for pipeline in (train, evaluation):
        assert pipeline.num_classes == 10 and pipeline.selection.classes.tolist() == [6, 7, 3, 0, 5]


def test_sd_8bit_and_dense_8bit_quantize_activations_and_gradients():
    for setting in ("sd_8bit", "dense_8bit"):
        config = paper.get_config(f"cifar10,resnet18,{setting}")
        assert (config.sd.activation_bits, config.sd.gradient_bits) == (8, 8)
        assert config.model.sd == (setting == "sd_8bit")
        assert (config.sd.activation_range, config.sd.range_momentum) == ("batch", 0.1)
    tuned = paper.get_config("cifar10,resnet18,sd_8bit,tuned")
    assert (tuned.sd.activation_range, tuned.sd.range_momentum) == ("sample", 0.9)


def test_tuned_recipe_departs_where_measured():
    scratch = paper.get_config("cifar10,resnet18,sd_scratch,tuned")
    assert (scratch.sd.threshold, scratch.sd.init_scheme, scratch.departures) == (2.0**-5, "lecun", [])
    for setting in ("inference_only", "adaptation", "finetune"):
        config = paper.get_config(f"cifar10,resnet18,{setting},tuned")
        assert (config.sd.threshold, config.optim.switch_bar, config.optim.weight_decay) == (0.03, 200, 0.0)


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"recipe 'authors': pick one of \('reference', 'tuned'\)"):
        paper.get_config("cifar10,resnet18,dense,authors")


def test_reference_recipe_for_a_model_the_authors_never_ran_says_so():
    with pytest.warns(UserWarning, match="never ran this model"):
        paper.get_config("cifar10,resnet20,sd_scratch,reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paper.get_config("cifar10,resnet18,sd_scratch,reference")
        paper.get_config("cifar10,resnet20,sd_scratch,tuned")


@pytest.mark.parametrize("setting", paper.SETTINGS)
def test_fashion_mnist_configs_build(setting):
    from experiments.configs import fashion_mnist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the authors never ran LeNet-5
        config = fashion_mnist.get_config(f"lenet5,{setting}")
    dense = setting in ("dense", "dense_8bit") or setting == "inference_only"  # reference: dense, projected
    assert config.input.dataset == "fashion_mnist_idx" and config.model.sd == (not dense)
    with tfds.testing.mock_data(num_examples=64):
        pipeline = data.input_pipeline(config.input.dataset, "train", batch_size=4, seed=0,
                                       setting=config.input.setting, part=config.input.part)
        batch = next(pipeline)
    net = trainer._model(config, pipeline.num_classes, SDRules.from_config(config))
    jax.eval_shape(lambda: net.init(jax.random.key(0), batch["image"], train=False))
    with pytest.raises(ValueError, match="model,setting"):
        fashion_mnist.get_config("lenet5")


def test_data_dir_is_one_value_at_the_top_and_in_input():
    config = paper.get_config("cifar10_jpeg,resnet20,sd_8bit,tuned")
    config.data_dir = "/prepared"
    assert config.input.data_dir == "/prepared"


def test_sd_from_scratch_without_batch_norm_takes_a_lower_learning_rate():
    from experiments.configs import fashion_mnist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fashion_mnist.get_config("lenet5,sd_8bit").optim.lr == 0.01
        assert fashion_mnist.get_config("resnet20,sd_8bit").optim.lr == 0.1


def test_reference_transfer_settings_prune_structurally_with_the_authors_fractions():
    config = paper.get_config("cifar10,resnet18,finetune,reference")
    assert len(config.sd.rules) == 21  # one per line of resnet18-structure-percentage.txt
    assert all(options["prune_criterion"] == "population" for _, options in config.sd.rules)
    SDRules.from_config(config)  # the rules are valid SD rules
    with pytest.warns(UserWarning):
        other = paper.get_config("cifar10,resnet20,adaptation,reference")
    assert other.sd.rules == [] and any("no structure file" in note for note in other.departures)
    assert paper.get_config("cifar10,resnet18,adaptation,tuned").sd.rules == []
