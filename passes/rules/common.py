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
from moeify.passes.linear import first_input, linear_ref, skip_back  # noqa: F401  (rules import them here)
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
