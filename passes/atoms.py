"""Atoms: the modules and functions the passes recognise without looking inside them.

Capture treats every atom module as a leaf (it is never traced through), so a graph shows
`call_module` nodes for linear-likes, activations and dropouts. Analysis asks this file three
questions about a node: is it linear-like (and where are its weights), is it an activation (and which
of moeify's), is it a pass-through (dropout, dtype cast) that an FFN may carry between its parts.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from moeify.activations import ACTIVATIONS, CUSTOM

# --- activations ---------------------------------------------------------------------------------
# Named here: the activations moeify's experts compute by name (moeify.activations.ACTIVATIONS), each
# only where the dense call is exactly that function. Any other elementwise activation is "custom"
# (activation.py builds the module computing it); elementwise.py decides what is elementwise.


def _hf_gelu(m) -> str:
    return "gelu" if getattr(m, "act", None) is F.gelu else CUSTOM  # use_gelu_python: the erf formula


def _hf_gelu_tanh(m) -> str:
    act = getattr(m, "act", None)
    exact = isinstance(act, functools.partial) and act.func is F.gelu
    exact = exact and act.keywords == {"approximate": "tanh"}
    return "gelu_tanh" if exact else CUSTOM


def _hf_mish(m) -> str:
    return "mish" if getattr(m, "act", None) is F.mish else CUSTOM


# transformers' activation classes, by class name -> our name for an instance (CUSTOM when not ours).
_HF_ACTIVATIONS: dict[str, object] = {
    "GELUActivation": _hf_gelu,
    "GELUTanh": _hf_gelu_tanh,
    "PytorchGELUTanh": _hf_gelu_tanh,
    "NewGELUActivation": lambda m: "gelu_tanh",  # "gelu_new": the tanh formula written out
    "FastGELUActivation": lambda m: "gelu_tanh",  # the same tanh formula, constants folded
    "QuickGELUActivation": lambda m: "quick_gelu",
    "SiLUActivation": lambda m: "silu",
    "MishActivation": _hf_mish,
    "ReLUSquaredActivation": lambda m: "relu2",  # torch.square(F.relu(x)), as moeify's relu2
    "LinearActivation": lambda m: "identity",
}

# activation classes defined inside one transformers model, by class name.
_HF_MODEL_ACTIVATIONS: dict[str, object] = {
    "BloomGelu": lambda m: "gelu_tanh",  # x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 x^2)))
}


def _at_defaults(m: nn.Module, **defaults) -> bool:
    return all(getattr(m, k) == v for k, v in defaults.items())


# torch.nn activation modules -> our name for an instance (CUSTOM when not ours).
_TORCH_ACT_MODULES: dict[type, object] = {
    nn.ReLU: lambda m: "relu",
    nn.SiLU: lambda m: "silu",
    nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu",
    nn.Tanh: lambda m: "tanh",
    nn.Sigmoid: lambda m: "sigmoid",
    nn.Mish: lambda m: "mish",
    nn.Hardswish: lambda m: "hardswish",
    nn.Hardsigmoid: lambda m: "hardsigmoid",
    nn.ReLU6: lambda m: "relu6",
    nn.SELU: lambda m: "selu",
    nn.Softsign: lambda m: "softsign",
    nn.LeakyReLU: lambda m: "leaky_relu" if _at_defaults(m, negative_slope=0.01) else CUSTOM,
    nn.ELU: lambda m: "elu" if _at_defaults(m, alpha=1.0) else CUSTOM,
    nn.Softplus: lambda m: "softplus" if _at_defaults(m, beta=1.0, threshold=20.0) else CUSTOM,
}

# functions (and tensor methods, by name) -> our name when called on the tensor alone.
_ACT_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.silu: "silu",
    F.gelu: "gelu",  # approximate="tanh" handled below
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.relu6: "relu6",
    F.selu: "selu",
    torch.selu: "selu",
    F.softsign: "softsign",
    F.elu: "elu",  # these three only at their defaults: a further argument makes them custom
    F.leaky_relu: "leaky_relu",
    F.softplus: "softplus",
}
_ACT_METHODS: dict[str, str] = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}

SUPPORTED = ", ".join(sorted(a for a in ACTIVATIONS if a != "identity"))
"""Deprecated: every elementwise activation is supported now (unnamed ones as "custom")."""


def is_hf_activation(m: nn.Module) -> bool:
    """An activation class of transformers (its `activations` module: all elementwise), or a model's."""
    cls = type(m)
    if cls.__module__.startswith("transformers.activations"):
        return True
    return cls.__module__.startswith("transformers.models.") and cls.__name__ in _HF_MODEL_ACTIVATIONS


def is_activation_module(m: nn.Module) -> bool:
    return type(m) in _TORCH_ACT_MODULES or isinstance(m, _OTHER_TORCH_ACTS) or is_hf_activation(m)


# torch.nn's other elementwise activations: atoms too, computed as "custom"
_OTHER_TORCH_ACTS = (nn.CELU, nn.Hardtanh, nn.PReLU, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink,
                     nn.Hardshrink, nn.Threshold)


def _module_name(m: nn.Module) -> str:
    if type(m) in _TORCH_ACT_MODULES:
        return _TORCH_ACT_MODULES[type(m)](m)
    in_activations = type(m).__module__.startswith("transformers.activations")
    table = _HF_ACTIVATIONS if in_activations else _HF_MODEL_ACTIVATIONS
    name_of = table.get(type(m).__name__)
    return name_of(m) if name_of is not None else CUSTOM


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, str | None, str]:
    """(is a known activation, our name (CUSTOM when moeify has none for it), a display name).

    Known: an activation module (torch's, transformers') or an activation function or method. Other
    elementwise computations are found by elementwise.py, not here."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or not is_activation_module(m):
            return False, None, ""
        return True, _module_name(m), type(m).__name__
    if node.op == "call_function":
        fn = node.target
        if isinstance(fn, functools.partial):  # e.g. partial(F.gelu, approximate="tanh")
            alone = len(node.args) == 1 and not node.kwargs
            if fn.func is F.gelu and fn.keywords == {"approximate": "tanh"} and not fn.args and alone:
                return True, "gelu_tanh", "gelu(approximate='tanh')"
            return False, None, ""
        if fn not in _ACT_FUNCTIONS:
            return False, None, ""
        name = _ACT_FUNCTIONS[fn]
        if fn is F.gelu and node.kwargs.get("approximate", "none") == "tanh" and len(node.args) == 1:
            return True, "gelu_tanh", "gelu(approximate='tanh')"
        extra = {k: v for k, v in node.kwargs.items() if k != "inplace" and (k, v) != ("approximate", "none")}
        plain = len(node.args) == 1 and not extra
        return True, name if plain else CUSTOM, getattr(fn, "__name__", str(fn))
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return True, _ACT_METHODS[node.target] if len(node.args) == 1 else CUSTOM, f".{node.target}()"
    return False, None, ""


# --- linear-likes --------------------------------------------------------------------------------


def is_conv1d(m: nn.Module) -> bool:
    """HF's Conv1D (GPT-2 and kin): a linear layer whose weight is stored transposed, [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx") and hasattr(m, "weight")


def is_linear_module(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


# --- pass-throughs -------------------------------------------------------------------------------

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CAST_METHODS = {"to", "type", "type_as", "contiguous", "float", "half", "bfloat16"}


def is_dropout_module(m: nn.Module) -> bool:
    return isinstance(m, DROPOUT_MODULES)


def pass_through_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'dropout' or 'cast' when the node carries its first input through unchanged in value, else None."""
    if node.op == "call_module" and is_dropout_module(modules.get(node.target, nn.Module())):
        return "dropout"
    if node.op == "call_function" and node.target in (F.dropout, torch.dropout):
        return "dropout"
    if node.op == "call_method" and node.target in _CAST_METHODS:
        return "cast"
    return None


def is_atom(m: nn.Module) -> bool:
    """Modules capture never traces through (an MoELayer already converted is one: never converted twice)."""
    from moeify.layer import MoELayer

    return is_linear_module(m) or is_activation_module(m) or is_dropout_module(m) or isinstance(m, MoELayer)


MUL_TARGETS = (operator.mul, torch.mul)
