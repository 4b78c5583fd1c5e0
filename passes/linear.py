"""Linear-like nodes of a traced graph: which node is a projection (nn.Linear, HF Conv1D, F.linear on
parameters) and where its weights live, and the walk back over pass-throughs (dropouts, casts) to one.

Shared by the FFN rules (moeify.passes.rules) and the activation finder (moeify.passes.activation).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from moeify.passes.atoms import is_conv1d, pass_through_kind
from moeify.passes.capture import Captured
from moeify.passes.match import LinearRef


def first_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return arg if isinstance(arg, fx.Node) else None


def skip_back(node: fx.Node | None, cap: Captured) -> tuple[fx.Node | None, list[fx.Node]]:
    """Walk back over dropouts and dtype casts; returns the producing node and the nodes walked over."""
    walked = []
    while node is not None and pass_through_kind(node, cap.modules) is not None:
        walked.append(node)
        node = first_input(node)
    return node, walked


def _param_path(node, cap: Captured):
    """A get_attr node naming a parameter -> (full path, tensor); anything else -> None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        tensor = cap.module.get_parameter(node.target)
    except AttributeError:
        return None
    return cap.full(node.target), tensor


def linear_ref(node: fx.Node | None, cap: Captured) -> LinearRef | None:
    """The LinearRef of a linear-like node (nn.Linear, HF Conv1D, F.linear on parameters), else None."""
    if node is None:
        return None
    if node.op == "call_module":
        m = cap.modules.get(node.target)
        path = cap.full(node.target)
        if isinstance(m, nn.Linear):
            return LinearRef(
                "linear",
                path,
                f"{path}.weight",
                f"{path}.bias" if m.bias is not None else None,
                m.in_features,
                m.out_features,
            )
        if m is not None and is_conv1d(m):
            bias = getattr(m, "bias", None)
            return LinearRef(
                "conv1d",
                path,
                f"{path}.weight",
                f"{path}.bias" if bias is not None else None,
                m.weight.shape[0],
                m.weight.shape[1],
            )
        return None
    if node.op == "call_function" and node.target is F.linear:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wp = _param_path(w, cap)
        if wp is None or wp[1].dim() != 2:
            return None
        bp = _param_path(b, cap) if b is not None else None
        if b is not None and bp is None:
            return None  # a computed bias: not a plain projection
        return LinearRef("function", None, wp[0], bp[0] if bp else None, wp[1].shape[1], wp[1].shape[0])
    return None
