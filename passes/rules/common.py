"""What every FFN rule shares: the `Candidate` a pattern yields, node helpers, and the common checks.

A rule is pattern + check + rewrite (onnxscript's rewriter is the model):
- `pattern(down, cap)` starts at a linear-like node (the would-be down projection) and walks backwards;
  it returns a `Candidate` when the structure fits, None when it is not an FFN at all (no reason kept:
  attention, norms and heads fall out here silently);
- `check(cand)` returns None or the reason the candidate is not converted (an activation that is not
  elementwise, does not map back to the model width, hidden activations used elsewhere; reading their
  metadata -- `.device`, `.dtype`, `.shape` -- is not a use);
- `rewrites`: the surgeries that can apply to the rule's shape, in order of preference (rewrite.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from moeify.passes import metadata
from moeify.passes.activation import Activation
from moeify.passes.atoms import activation_of, is_conv1d, pass_through_kind
from moeify.passes.capture import Captured
from moeify.passes.match import LinearRef


@dataclass
class Candidate:
    rule: str
    cap: Captured
    x: fx.Node  # the FFN input [..., D]
    down: fx.Node
    down_ref: LinearRef
    up: fx.Node
    up_ref: LinearRef
    act: fx.Node
    activation: str | None  # our name, "custom", or None when not elementwise
    act_display: str
    gate: fx.Node | None = None
    gate_ref: LinearRef | None = None
    body: list[fx.Node] = field(default_factory=list)  # every node strictly inside the FFN, down included
    act_found: Activation | None = None  # the activation's nodes; .module() computes it

    @property
    def shape_reads(self) -> list[fx.Node]:
        """Reads of the hidden values' shape outside the FFN (fine unless the surgery changes that shape)."""
        inside = set(self.body) | set(self.act_found.helpers if self.act_found else ())
        return [u for n in self.body if n is not self.down for u in metadata.reads_of(n)
                if u not in inside and (u.op == "call_method" or u.args[1] == "shape")]

    @property
    def key(self) -> tuple:
        """Identity of the FFN across capture sites: where its weights live."""
        return (
            self.up_ref.weight,
            self.up_ref.rows,
            self.down_ref.weight,
            self.gate_ref.weight if self.gate_ref else None,
        )

    @property
    def label(self) -> str:
        parts = [f"up={self.up_ref.where}"]
        if self.gate_ref is not None:
            parts.insert(0, f"gate={self.gate_ref.where}")
        return ", ".join(parts + [f"down={self.down_ref.where}"])


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


def activation_node(node: fx.Node | None, cap: Captured):
    """Deprecated (one node only; see activation.find): (is activation, our name or None, display)."""
    if node is None:
        return False, None, ""
    return activation_of(node, cap.modules)


def common_check(c: Candidate) -> str | None:
    """Checks every FFN rule makes; None when the candidate is fine."""
    d_model, hidden = c.up_ref.in_features, c.down_ref.in_features
    if c.activation is None:
        why = c.act_found.reason if c.act_found is not None else f"{c.act_display} is not elementwise"
        return f"the activation is not elementwise: {why} [{c.label}]"
    if c.down_ref.out_features != d_model:
        return (
            f"the down projection maps {hidden} -> {c.down_ref.out_features} features, not back to the "
            f"input width {d_model}: a head or a projection, not an FFN [{c.label}]"
        )
    inside = set(c.body) | set(c.act_found.helpers if c.act_found else ())
    for node in c.body:
        if node is c.down:
            continue
        outside = [u for u in node.users if u not in inside and not metadata.is_read(u)]
        if outside:
            return (
                f"the FFN's hidden values ({node.name}) are also used outside it, by "
                f"{', '.join(u.name for u in outside)} [{c.label}]"
            )
    return None
