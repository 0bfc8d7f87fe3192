"""What every command reads: the model a config describes, and variables from any parameter file.

A config that describes a run (a training config, `experiments/configs/default.py` or an experiment)
names the model (`model.name`, `model.options`), its dataset and setting (`input`: image size,
channels and the number of classes, an adaptation part's included) and the SD layers (`sd`, read by
`SDRules.from_config`). `--model` names another zoo model; that model then takes its zoo input
(ImageNet forms 224 x 224 and 1000 classes, the others 32 x 32 and 10).

Variables come from `.npz` files or Orbax checkpoints (`sd_jax.io.load_variables`): a bare parameter
tree, a dense or SD training checkpoint, or the output of `--mode=decompose`. Whether they are SD is
read from them (an `sd_coeff` collection), not from the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sd_jax import data
from sd_jax import io as sd_io
from sd_jax import models
from sd_jax.cost import layers
from sd_jax.cost.comparison import cost_options
from sd_jax.cost.pricing import energy_pricing
from sd_jax.data import registry, settings
from sd_jax.models.synthetic import he_normal_params
from sd_jax.nn import allocate
from sd_jax.nn.layers import SD_COEFF, SD_COLLECTIONS
from sd_jax.nn.rules import SDRules


# Collections a model's variables must bring; the others (batch statistics, activation ranges) may be
# missing, e.g. from a bare parameter file, and then keep their initial values where they are used.
REQUIRED = ("params", *SD_COLLECTIONS)


@dataclasses.dataclass(frozen=True)
class Target:
    """A zoo model and the input it takes: name, classes, input shape (1, side, side, channels) or, for a
    text model, (1, context), options."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, rules: SDRules | None = None) -> Any:
        """The dense model, or the SD model `rules` describe."""
        return models.get(self.name, num_classes=self.num_classes, sd=rules or False, **self.options)

    def sample(self) -> jax.Array:
        return jnp.zeros(self.input_shape, jnp.float32)


def target_of(config: Any, model_name: str | None = None) -> Target:
    """The model `config` describes, or the zoo model `model_name` with its zoo input when it names another."""
    described = config.model.name if config is not None and "model" in config else None
    name = model_name or described
    if not name:
        raise ValueError("no model to build: pass --model=NAME (a zoo model, e.g. resnet20) or a config with model.name")
    if name != described or "input" not in config:
        imagenet = name.endswith("_imagenet")
        side = 224 if imagenet else 32
        return Target(name, 1000 if imagenet else 10, (1, side, side, 3))
    spec = registry.get(config.input.dataset)
    classes = settings.num_outputs(spec.num_classes, setting=config.input.setting, part=config.input.part,
                                   source_classes=spec.source_classes, split_rule=config.input.split_rule)
    options = config.model.options.to_dict() if "options" in config.model else {}
    return Target(name, classes, (1, *spec.input_shape), options)


def targeted_rules(config: Any, variables: Mapping[str, Any], model_name: str | None = None
                   ) -> tuple[SDRules, allocate.Allocation | None]:
    """`allocate.targeted_rules` for the dense `variables` of the model (`target_of`): its layers' inference
    energy priced (`sd_jax.cost.pricing`) when the config sets `sd.target_energy_ratio`, its layers weighed
    by their loss on `sd.target_calibration` training images when that is set."""
    wanted = SDRules.target_of(config)
    if wanted is None:
        return SDRules.from_config(config), None
    target = target_of(config, model_name) if wanted.counts_energy or SDRules.calibration_of(config) else None
    pricing = None
    if wanted.counts_energy:
        network = layers.extract_layers(target.build(), target.input_shape, train=False)
        pricing = energy_pricing(network, cost_options(config))
    count = SDRules.calibration_of(config)
    loss = calibration_loss(config, variables, target, count) if count else None
    return allocate.targeted_rules(config, variables.get("params", {}), pricing, loss)


def calibration_loss(config: Any, variables: Mapping[str, Any], target: Target, count: int
                     ) -> Callable[[Any], float]:
    """The mean cross entropy of the dense model of `target` on the first `count` training images, as a
    function of its parameter tree (the other collections from `variables`, or initial where missing)."""
    batch = calibration_batch(config, count)
    model = target.build()
    fresh = jax.jit(lambda key: model.init(key, target.sample(), train=False))(jax.random.key(0))
    others = {name: variables.get(name, tree) for name, tree in fresh.items() if name != "params"}

    @jax.jit
    def loss(params: Any) -> jax.Array:
        logits = model.apply({**others, "params": params}, batch["image"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    return lambda params: float(loss(params))


def pipeline(config: Any, split: str, batch_size: int, **options: Any) -> data.Pipeline:
    """The `split` ('train' or 'eval') of the config's dataset, in its setting, part and split rule;
    `options` go to `sd_jax.data.input_pipeline` (e.g. training=False)."""
    if config is None or "input" not in config:
        raise ValueError("reading the dataset needs a config that describes a run (an `input` section): pass "
                         "--config=experiments/configs/default.py or the run's config")
    common = config.input
    return data.input_pipeline(common.dataset, split, batch_size=batch_size, seed=config.seed,
                               setting=common.setting, part=common.part, split_seed=common.split_seed,
                               split_rule=common.split_rule, data_dir=common.data_dir or None, **options)


def calibration_batch(config: Any, count: int) -> dict[str, jax.Array]:
    """The first `count` training images and labels of the config's dataset, in order and not augmented
    (preprocessed as in training)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"calibration needs a positive number of images, got {count!r}")
    return next(iter(pipeline(config, "train", count, training=False)))


def calibration_images(config: Any, count: int) -> jax.Array:
    """`calibration_batch`'s images: what sets an integer model's activation ranges
    (`sd_jax.serve.integer.quantize`)."""
    return calibration_batch(config, count)["image"]


def read_variables(path: str) -> dict[str, Any]:
    """The variable collections at `path`, every value finite (else CheckpointError); a bare parameter tree
    becomes {"params": tree}."""
    variables = sd_io.check_finite(sd_io.load_variables(path), path)
    if isinstance(variables.get("params"), Mapping):
        return dict(variables)
    return {"params": variables}


def is_sd(variables: Mapping[str, Any]) -> bool:
    """True for the variables of an SD model (they hold C)."""
    return SD_COEFF in variables


def arranged(variables: Mapping[str, Any], model: Any, target: Target, source: str, *,
             required: tuple[str, ...] | None = REQUIRED) -> dict[str, Any]:
    """`variables` in the nesting of `model`'s variables, the collections the model has; raises
    CheckpointError when they do not fit (another model, or another number of classes) or lack one of
    the `required` collections (None: every collection of the model)."""
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), target.sample(), train=False))
    variables = models.upgrade_layout(dict(variables))  # saved before zoo blocks nested
    placed = {name: variables[name] for name in template if name in variables}
    needed = {name: tree for name, tree in template.items()
              if name in variables or required is None or name in required}
    sd_io.check_fits(needed, placed, source,
                     what=f"the variables do not fit model {target.name!r} with {target.num_classes} classes",
                     fix="pass the config the run trained with (--config) or the model they belong to (--model)")
    return placed


def dense_params(target: Target, path: str | None) -> dict[str, Any]:
    """The dense parameters at `path` in the model's nesting, or He-normal random ones without a path."""
    model = target.build()
    if path is None:
        return he_normal_params(model, target.input_shape)
    variables = read_variables(path)
    if is_sd(variables):
        raise ValueError(f"{path}: holds SD variables; this step needs dense parameters")
    return arranged({"params": variables["params"]}, model, target, path)["params"]
