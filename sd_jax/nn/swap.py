"""SD layers in a user's own model, which knows nothing of sd_jax: `swap_layers(model, rules)`.

Two mechanisms put SD layers into a network:
- The model zoo uses **layer factories**: every zoo model builds its layers through its `conv` and
  `dense` fields, and `models.get(name, sd=rules)` passes `SDRules.conv_factory()` /
  `dense_factory()`, which return `SDConv` / `SDDense` for the layers the rules select.
- A user's model that calls `nn.Conv` / `nn.Dense` directly is converted by **method interception**
  (`flax.linen.intercept_methods`): `swap_layers` wraps the model so that, during its `init` and
  `apply`, each `nn.Conv` / `nn.Dense` call that the rules select runs the SD forward pass instead,
  with the SD variables declared in that layer's own scope. Variable paths stay the dense model's:
  `sd_coeff/<module path>/coeff`, biases in `params/<module path>/bias`. Layer names are module
  paths joined by '/', e.g. `Conv_0` or `block/Dense_1`.

The swap covers what SD layers support: 2-D `nn.Conv` on NHWC inputs (any stride, padding 'SAME',
'VALID' or explicit pairs, kernel dilation, feature groups) and `nn.Dense`; a selected layer with
input dilation, a weight mask, 'CIRCULAR'/'CAUSAL' padding or a non-2-D kernel raises ValueError
naming it. Any other layer with a `params` kernel (`nn.ConvTranspose`, `nn.DenseGeneral`,
`nn.ConvLocal`, a hand-written layer) stays dense only where `to_sd` keeps its kernel dense too: a
rule that selects it, or no rule where the defaults select its kernel by shape (`SDRules.kernel_plan`),
raises ValueError naming it, at `init` and at `apply` of variables `to_sd` converted, so the model and
its variables agree on what is SD. Custom `precision`, `dot_general` or `param_dtype` of a swapped layer are not used.
Only layers called while the wrapper's `init` / `apply` runs are swapped: call the wrapper, not the
wrapped model, inside `jax.jit`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from sd_jax.nn.layers import SD_COEFF, sd_conv_forward, sd_dense_forward
from sd_jax.nn.rules import SDRules, layer_name


class SwappedModel:
    """A Flax model whose `nn.Conv` / `nn.Dense` layers run as SD layers where `rules` select them.

    `init`, `init_with_output` and `apply` take the arguments of the wrapped module's own methods.
    """

    def __init__(self, model: nn.Module, rules: SDRules) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"swap_layers: {type(model).__name__} is not a flax.linen Module; pass the model itself")
        if not isinstance(rules, SDRules):
            raise ValueError(f"swap_layers: rules must be an SDRules, got {type(rules).__name__}; "
                             "build one with sd_jax.nn.SDRules([(pattern, options), ...], **defaults)")
        self.model = model
        self.rules = rules

    def __repr__(self) -> str:
        return f"SwappedModel({type(self.model).__name__}, {self.rules!r})"

    def _run(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        seen: list[str] = []

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if not isinstance(module, (nn.Conv, nn.Dense)):  # stays dense: check that nothing makes it SD
                layer = layer_name(module.scope.path)
                if module.has_variable(SD_COEFF, "coeff"):
                    raise ValueError(f"layer '{layer}': the variables hold C for this {type(module).__name__} "
                                     f"(to_sd decomposed its kernel); {_keep_dense(layer)}")
                result = next_fun(*call_args, **call_kwargs)
                if module.has_variable("params", "kernel"):
                    seen.append(layer)
                    _check_not_selected(layer, module, self.rules)
                return result
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            layer = layer_name(module.scope.path)
            seen.append(layer)
            is_conv = isinstance(module, nn.Conv)
            kernel_size = None
            if is_conv:
                kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
            options = self.rules.select(layer, kernel_size)
            if options is None:
                return next_fun(*call_args, **call_kwargs)
            x = call_args[0] if call_args else call_kwargs["inputs"]
            common = dict(layer=layer, options=options, features=module.features, use_bias=module.use_bias,
                          dtype=module.dtype, bias_init=module.bias_init)
            if not is_conv:
                return sd_dense_forward(module, x, **common)
            _check_conv(layer, module)
            return sd_conv_forward(
                module, x, kernel_size=module.kernel_size, strides=module.strides, padding=module.padding,
                kernel_dilation=module.kernel_dilation, feature_group_count=module.feature_group_count, **common)

        with nn.intercept_methods(interceptor):
            result = method(*args, **kwargs)
        self.rules.check_matches(dict.fromkeys(seen))
        return result

    def init(self, *args: Any, **kwargs: Any) -> Any:
        """`model.init` with the selected layers swapped."""
        return self._run(self.model.init, *args, **kwargs)

    def init_with_output(self, *args: Any, **kwargs: Any) -> Any:
        """`model.init_with_output` with the selected layers swapped."""
        return self._run(self.model.init_with_output, *args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """`model.apply` with the selected layers swapped."""
        return self._run(self.model.apply, *args, **kwargs)


def _keep_dense(layer: str) -> str:
    return (f"SD layers take nn.Dense and 2-D nn.Conv: keep it dense with a rule ('^{layer}$', {{'skip': True}}) "
            "first in the rules, and convert the dense variables again with the same rules")


def _check_not_selected(layer: str, module: nn.Module, rules: SDRules) -> None:
    """Raise ValueError when the rules select the kernel of `module`, a layer the swap cannot run as SD:
    `to_sd` with the same rules would decompose it."""
    shape = tuple(module.get_variable("params", "kernel").shape)
    try:
        selected = rules.kernel_plan(layer, shape) is not None
    except ValueError:  # a rule selects it, but its kernel is no kernel of a layer the rules know
        selected = True
    if selected:
        raise ValueError(f"layer '{layer}': the rules select this {type(module).__name__} (kernel {shape}), "
                         f"which cannot become SD; {_keep_dense(layer)}")


def _check_conv(layer: str, module: nn.Conv) -> None:
    if module.mask is not None:
        raise ValueError(f"layer '{layer}': nn.Conv with a weight mask cannot become SD; skip it with a rule")
    dilation = module.input_dilation
    if not (dilation is None or dilation == 1 or all(d == 1 for d in dilation)):
        raise ValueError(f"layer '{layer}': input_dilation={dilation!r} is not supported by SD layers; "
                         "skip it with a rule")


def swap_layers(model: nn.Module, rules: SDRules | None = None) -> SwappedModel:
    """`model` with its nn.Conv / nn.Dense layers swapped for SD layers by `rules` (default: all it can)."""
    return SwappedModel(model, SDRules() if rules is None else rules)
