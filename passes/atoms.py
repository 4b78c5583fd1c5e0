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

from moeify.activations import ACTIVATIONS

# --- activations ---------------------------------------------------------------------------------

# transformers' activation classes, by class name -> our name (None = recognised but unsupported).
_HF_ACTIVATIONS: dict[str, str | None] = {
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",  # "gelu_new": the tanh formula written out
    "FastGELUActivation": "gelu_tanh",  # the same tanh formula, constants folded
    "AccurateGELUActivation": None,  # a different polynomial: not one of ours
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "ClippedGELUActivation": None,
    "MishActivation": None,
    "LinearActivation": None,
    "LaplaceActivation": None,
    "ReLUSquaredActivation": None,
    "SqrtSoftplusActivation": None,
    "XIELUActivation": None,
}

# activation classes defined inside one transformers model, by class name.
_HF_MODEL_ACTIVATIONS: dict[str, str | None] = {
    "BloomGelu": "gelu_tanh",  # x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 x^2)))
}

# torch.nn activation modules -> our name (None = elementwise but unsupported).
_TORCH_ACT_MODULES: dict[type, str | None] = {
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.GELU: "gelu",  # approximate="tanh" handled below
    nn.Tanh: None,
    nn.Sigmoid: None,
    nn.LeakyReLU: None,
    nn.ReLU6: None,
    nn.ELU: None,
    nn.SELU: None,
    nn.CELU: None,
    nn.Mish: None,
    nn.Hardswish: None,
    nn.Hardtanh: None,
    nn.Softplus: None,
    nn.PReLU: None,
    nn.GLU: None,
    nn.Hardsigmoid: None,
    nn.LogSigmoid: None,
    nn.Softsign: None,
}

# functions (and tensor methods, by name) -> our name (None = elementwise but unsupported).
_ACT_FUNCTIONS: dict[object, str | None] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.silu: "silu",
    F.gelu: "gelu",  # approximate="tanh" handled below
    torch.tanh: None,
    F.tanh: None,
    torch.sigmoid: None,
    F.sigmoid: None,
    F.leaky_relu: None,
    F.relu6: None,
    F.elu: None,
    F.selu: None,
    F.mish: None,
    F.hardswish: None,
    F.softplus: None,
}
_ACT_METHODS: dict[str, str | None] = {"relu": "relu", "tanh": None, "sigmoid": None}

SUPPORTED = ", ".join(sorted(a for a in ACTIVATIONS if a != "identity"))


def is_activation_module(m: nn.Module) -> bool:
    return type(m) in _TORCH_ACT_MODULES or _hf_activation_name(m) is not None


def _hf_activation_name(m: nn.Module) -> str | None:
    cls = type(m)
    if cls.__module__.startswith("transformers.activations") and cls.__name__ in _HF_ACTIVATIONS:
        return cls.__name__
    if cls.__module__.startswith("transformers.models.") and cls.__name__ in _HF_MODEL_ACTIVATIONS:
        return cls.__name__
    return None


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, str | None, str]:
    """(is an elementwise activation, our name or None when unsupported, a display name)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None:
            return False, None, ""
        if type(m) in _TORCH_ACT_MODULES:
            name = _TORCH_ACT_MODULES[type(m)]
            if isinstance(m, nn.GELU) and m.approximate == "tanh":
                name = "gelu_tanh"
            return True, name, type(m).__name__
        hf = _hf_activation_name(m)
        if hf is not None:
            return True, {**_HF_ACTIVATIONS, **_HF_MODEL_ACTIVATIONS}[hf], hf
        return False, None, ""
    if node.op == "call_function":
        fn = node.target
        if isinstance(fn, functools.partial):  # e.g. partial(F.gelu, approximate="tanh")
            if fn.func is F.gelu and fn.keywords.get("approximate") == "tanh":
                return True, "gelu_tanh", "gelu(approximate='tanh')"
            fn = fn.func
        if fn in _ACT_FUNCTIONS:
            name = _ACT_FUNCTIONS[fn]
            if fn is F.gelu and node.kwargs.get("approximate", "none") == "tanh":
                name = "gelu_tanh"
            return True, name, getattr(fn, "__name__", str(fn))
        return False, None, ""
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return True, _ACT_METHODS[node.target], f".{node.target}()"
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
