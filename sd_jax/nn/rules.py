"""Which layers become SD, and with which options: name-pattern rules shared by building and converting.

`SDRules(rules, **defaults)` is the one description of an SD network. The same object builds the zoo
model (`models.get(name, sd=rules)`), swaps the layers of a user's model (`sd_jax.nn.swap_layers`)
and converts dense variables (`sd_jax.nn.to_sd`), so the model and its variables always agree.

`SDRules.from_config(config)` reads a config's `sd` section (the one schema of every mode: training,
decompose, analyze, export); `SDRules.option_defaults()` gives every option with its default, taken
from the option dataclasses (`SDOptions`, `DecomposeOptions`), the one place defaults live.
`planner()` hands the per-kernel choice to `sd_jax.core.network.decompose_network`, so training,
conversion and the decompose and analyze commands select layers by one engine.

A rule is a `(pattern, options)` pair: `pattern` is a regular expression searched in the layer name (the zoo's `stage1_block0/conv1`; in a user's model
the module path joined by '/', e.g. `Conv_0` or `encoder/Dense_1`); the first matching rule wins and
its options override `defaults`. Option keys:
- `skip`: True keeps the layer dense (nn.Conv / nn.Dense). Use it to leave the first conv
  (`("^stem/conv$", {"skip": True})`) or the classifier (`("^head/dense$", {"skip": True})`) dense.
- layer options (`SDOptions`): mode, threshold, max_coeff, init_scheme, group_size, row_length,
  max_rows, kind ('conv' or 'depthwise'; dense layers are always 'dense'), activation_bits and
  gradient_bits (None or e.g. 8: low-precision training, see `sd_jax.nn.layers`).
- decomposition options (`DecomposeOptions`), used by `to_sd` only: iterations, prune_criterion,
  prune_fraction, prune_threshold, prune_group, row_threshold, decay_steps, threshold_decay
  (`sd_jax.nn.structure` turns the authors' per-layer pruning fractions into such rules).
  `threshold`, `max_coeff` and the blocking serve both the decomposition and the layer.

Layers no rule names follow the reference: 2-D convolutions up to `max_kernel_size` wide and dense
layers become SD; wider convolutions (the 7x7 ImageNet stem) and convolutions that are not 2-D stay
dense. A rule that names a layer the method cannot take raises ValueError naming the layer, and a
rule that matches no layer raises ValueError naming the pattern (it is almost always a typo).

In 'latent' mode the layer quantizes C with `pow2.min_coeff(threshold)`, the smallest magnitude a
decomposition with `threshold` produces (4e-3 -> 2^-8), so converted coefficients survive the
first forward pass unchanged; `pow2` mode uses C as stored.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn

from sd_jax.core import pow2
from sd_jax.core.allocation import Target
from sd_jax.core.decompose import DecomposeOptions
from sd_jax.core.network import MAX_KERNEL_SIZE, KernelPlan, Planner
from sd_jax.nn.layers import OPTION_NAMES, SDConv, SDDense, SDOptions

Rule = tuple[str, Mapping[str, Any]]
ModuleFactory = Callable[..., nn.Module]

DECOMPOSE_ONLY = ("iterations", "prune_criterion", "prune_fraction", "prune_threshold", "prune_group", "row_threshold",
                  "decay_steps", "threshold_decay", "threshold_scale")
SHARED = ("threshold", "max_coeff", "group_size", "row_length", "max_rows")
KNOWN_KEYS = ("skip", *OPTION_NAMES, *DECOMPOSE_ONLY)
# Config keys of the storage target (`sd_jax.nn.allocate`), read by `target_of`, not by the rules.
TARGET_KEYS = tuple(f"target_{field.name}" for field in dataclasses.fields(Target))
# Training images whose loss weighs the layers of a target's allocation (0: the reconstruction error alone).
CALIBRATION_KEY = "target_calibration"
# How a target is met: "per_layer" (each layer's threshold and pruning chosen, `allocate.allocate`) or
# "uniform" (one factor on every layer's configured threshold, `allocate.uniform`).
METHOD_KEY = "target_method"
TARGET_METHODS = ("per_layer", "uniform")
ALLOCATION_KEYS = (*TARGET_KEYS, CALIBRATION_KEY, METHOD_KEY)
# DecomposeOptions fields SD layers cannot represent.
UNSUPPORTED = {"pow2": "SD layers hold power-of-two coefficients; drop pow2",
               "row_scale": "SD layers store no per-row scale; drop row_scale"}


def layer_name(path: Sequence[str]) -> str:
    """The name rules match: a module path joined by '/' (`stage1_block0/conv1`)."""
    return "/".join(path)


def factory_layer_name(kwargs: Mapping[str, Any]) -> str:
    """The name of the layer a zoo factory is asked to build: its `parent`'s module path and its `name`
    (`name` alone when no parent is given)."""
    parent = kwargs.get("parent")
    return kwargs["name"] if parent is None else layer_name((*parent.path, kwargs["name"]))


def _check_keys(where: str, options: Mapping[str, Any]) -> None:
    for key in options:
        if key in UNSUPPORTED:
            raise ValueError(f"{where}: option {key!r} is not possible here; {UNSUPPORTED[key]}")
        if key not in KNOWN_KEYS:
            raise ValueError(f"{where}: unknown option {key!r}; known options are {sorted(KNOWN_KEYS)}")


class SDRules:
    """Name-pattern rules and defaults that pick the SD layers of a network and their options."""

    def __init__(self, rules: Sequence[Rule] = (), *, max_kernel_size: int = MAX_KERNEL_SIZE,
                 **defaults: Any) -> None:
        _check_keys("SDRules defaults", defaults)
        if "skip" in defaults:
            raise ValueError("SDRules defaults: 'skip' belongs in a rule; to keep a model dense, do not pass sd")
        self._patterns: list[tuple[re.Pattern, dict[str, Any]]] = []
        for index, rule in enumerate(rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                    and isinstance(rule[1], Mapping)):
                raise ValueError(f"rule {index}: {rule!r} is not a (pattern, options-dict) pair")
            pattern, options = rule
            _check_keys(f"rule {index} ({pattern!r})", options)
            try:
                self._patterns.append((re.compile(pattern), dict(options)))
            except re.error as error:
                raise ValueError(f"rule {index}: {pattern!r} is not a valid regular expression ({error})") from None
        self.rules = tuple((pattern.pattern, options) for pattern, options in self._patterns)
        self.defaults = dict(defaults)
        self.max_kernel_size = max_kernel_size
        # Check the options once, the way the layers and the decomposition will see them.
        for where, rule in [("SDRules defaults", {}), *((f"rule {i} ({p!r})", o) for i, (p, o) in enumerate(self.rules))]:
            self._layer_options(where, rule)
            DecomposeOptions.from_kwargs(where, **self._decompose_kwargs(rule))

    @classmethod
    def from_config(cls, config: Any) -> "SDRules":
        """The rules of a config's `sd` section (`rules`, `max_kernel_size` and option defaults); a config
        without one gives the reference defaults. Unknown keys raise ValueError naming them."""
        section = config.get("sd") if config is not None else None
        options = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
        for key in ALLOCATION_KEYS:
            options.pop(key, None)
        rules = [tuple(rule) for rule in options.pop("rules", ())]
        return cls(rules, max_kernel_size=options.pop("max_kernel_size", MAX_KERNEL_SIZE), **options)

    def as_section(self) -> dict[str, Any]:
        """The `sd` section that `from_config({"sd": section})` reads back as these rules (plain lists
        and dicts, so it can be written as JSON)."""
        return dict(self.defaults, rules=[[pattern, dict(options)] for pattern, options in self.rules],
                    max_kernel_size=self.max_kernel_size)

    @staticmethod
    def option_defaults() -> dict[str, Any]:
        """Every option of an `sd` section and its default, read from `SDOptions` and `DecomposeOptions`,
        with `max_kernel_size`, empty `rules` and the storage target of `Target` (off): what a config's `sd`
        section starts from (`kind` is a per-layer option, for rules only)."""
        layer, decompose, target = SDOptions(), DecomposeOptions(), Target()
        return dict({key: getattr(layer, key) for key in OPTION_NAMES if key != "kind"},
                    **{key: getattr(decompose, key) for key in DECOMPOSE_ONLY}, max_kernel_size=MAX_KERNEL_SIZE,
                    rules=[], **{key: getattr(target, key.removeprefix("target_")) for key in TARGET_KEYS},
                    **{CALIBRATION_KEY: 0, METHOD_KEY: TARGET_METHODS[0]})

    @staticmethod
    def option_types() -> dict[str, type]:
        """The type of each option whose default is None (e.g. activation_bits: int), for config placeholders."""
        hints = typing.get_type_hints(SDOptions)
        return {key: next(t for t in typing.get_args(hints[key]) if t is not type(None))
                for key in OPTION_NAMES if key != "kind" and getattr(SDOptions, key) is None}

    @staticmethod
    def target_of(config: Any) -> Target | None:
        """The storage target of a config's `sd` section (`target_compression`, `target_bytes`), None when
        none is set; ValueError when both are, or one is negative."""
        section = config.get("sd") if config is not None else None
        if section is None:
            return None
        return Target(**{key.removeprefix("target_"): section.get(key) or 0.0 for key in TARGET_KEYS}).check()

    def threshold_of(self, layer: str) -> float:
        """The decomposition threshold of `layer`: its first matching rule's, else the defaults'."""
        return float({**self.defaults, **(self._rule(layer) or {})}.get("threshold", DecomposeOptions.threshold))

    @staticmethod
    def calibration_of(config: Any) -> int:
        """`sd.target_calibration` of a config: how many training images weigh the layers of a target's
        allocation by their loss (0 when unset); ValueError for a negative or fractional count."""
        section = config.get("sd") if config is not None else None
        count = (section.get(CALIBRATION_KEY) if section is not None else 0) or 0
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"sd.{CALIBRATION_KEY}={count!r} must be a whole number of training images >= 0 "
                             f"(0 turns the calibration off); pass e.g. sd.{CALIBRATION_KEY}=256")
        return count

    @staticmethod
    def method_of(config: Any) -> str:
        """`sd.target_method` of a config ("per_layer" when unset); ValueError for an unknown method, a bad
        `sd.target_calibration` (`calibration_of`), or "uniform" with a calibration (which weighs per-layer
        choices that method does not make)."""
        calibration = SDRules.calibration_of(config)
        section = config.get("sd") if config is not None else None
        method = (section.get(METHOD_KEY) if section is not None else None) or TARGET_METHODS[0]
        if method not in TARGET_METHODS:
            raise ValueError(f"sd.{METHOD_KEY}={method!r} is not one of {TARGET_METHODS}; pass e.g. "
                             f"sd.{METHOD_KEY}=uniform")
        if method == "uniform" and calibration:
            raise ValueError(f"sd.{METHOD_KEY}='uniform' chooses no layer on its own, so sd.{CALIBRATION_KEY} "
                             f"has no per-layer choice to weigh; pass sd.{CALIBRATION_KEY}=0 or "
                             f"sd.{METHOD_KEY}=per_layer")
        return method

    def __repr__(self) -> str:
        return f"SDRules({list(self.rules)!r}, max_kernel_size={self.max_kernel_size}, **{self.defaults!r})"

    def _rule(self, layer: str) -> dict[str, Any] | None:
        for pattern, options in self._patterns:
            if pattern.search(layer):
                return options
        return None

    def _layer_options(self, layer: str, rule: Mapping[str, Any]) -> SDOptions:
        merged = {**self.defaults, **rule}
        options = SDOptions(**{key: merged[key] for key in OPTION_NAMES if key in merged}).check(layer)
        if options.mode == "latent":
            options = dataclasses.replace(options, threshold=pow2.min_coeff(float(options.threshold)))
        return options

    def _decompose_kwargs(self, rule: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**self.defaults, **rule}
        return {key: merged[key] for key in (*SHARED, *DECOMPOSE_ONLY) if key in merged}

    def select(self, layer: str, kernel_size: Sequence[int] | None) -> SDOptions | None:
        """The SD options of `layer`, or None to keep it dense; `kernel_size` is None for dense layers."""
        rule = self._rule(layer)
        if rule is not None and rule.get("skip", False):
            return None
        if kernel_size is not None:
            if len(kernel_size) != 2:
                if rule is None:
                    return None
                raise ValueError(
                    f"layer '{layer}': a {len(kernel_size)}-D convolution (kernel size {tuple(kernel_size)}); SD "
                    "layers take 2-D convolutions and dense layers; add a rule (pattern, {'skip': True}) for it")
            if rule is None and max(kernel_size) > self.max_kernel_size:
                return None
        elif rule is not None and rule.get("kind", "dense") != "dense":
            raise ValueError(f"layer '{layer}': kind {rule['kind']!r} is not possible for a dense layer; "
                             "drop the kind option from its rule")
        return self._layer_options(layer, rule or {})

    def kernel_plan(self, layer: str, kernel_shape: Sequence[int]) -> KernelPlan | None:
        """(kind, decomposition options) for the kernel of `layer`, or None to keep it dense."""
        dense = len(kernel_shape) == 2
        options = self.select(layer, None if dense else tuple(kernel_shape[:-2]))
        if options is None:
            return None
        kind = "dense" if dense else (options.kind or "conv")
        return kind, DecomposeOptions.from_kwargs(layer, **self._decompose_kwargs(self._rule(layer) or {}))

    def planner(self) -> Planner:
        """The plan of `decompose_network`: a kernel path 'stage1_block0/conv1/kernel' is planned by the rules
        of its layer 'stage1_block0/conv1'."""
        return lambda path, shape: self.kernel_plan(path.rpartition("/")[0], shape)

    def check_matches(self, layers: Iterable[str]) -> None:
        """Raise ValueError if a rule's pattern matches none of `layers`."""
        layers = list(layers)
        unused = [pattern.pattern for pattern, _ in self._patterns if not any(pattern.search(n) for n in layers)]
        if unused:
            raise ValueError(f"rule pattern(s) {unused} match no layer; the layers are {layers}")

    def conv_factory(self) -> ModuleFactory:
        """A zoo `conv` factory: SDConv where the rules select the layer (by its full name), else nn.Conv."""
        def build(**kwargs: Any) -> nn.Module:
            options = self.select(factory_layer_name(kwargs), tuple(kwargs["kernel_size"]))
            return nn.Conv(**kwargs) if options is None else SDConv(**kwargs, **dataclasses.asdict(options))
        return build

    def dense_factory(self) -> ModuleFactory:
        """A zoo `dense` factory: SDDense where the rules select the layer, else nn.Dense."""
        def build(**kwargs: Any) -> nn.Module:
            options = self.select(factory_layer_name(kwargs), None)
            if options is None:
                return nn.Dense(**kwargs)
            return SDDense(**kwargs, **{k: v for k, v in dataclasses.asdict(options).items() if k != "kind"})
        return build
