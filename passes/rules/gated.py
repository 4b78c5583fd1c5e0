"""Rule `gated`: down(dropout?(act(gate(x)) * up(x))) -- LLaMA/Mistral/Qwen SwiGLU, T5 v1.1 gated-gelu.

Pattern: a linear-like `down` whose input is, past dropouts and casts, a product of two branches: one an
activation of a linear-like (the gate), the other a linear-like (the up projection), both on the same
input. Check: the common ones, plus gate and up of one width, equal to down's input width.
"""

from __future__ import annotations

from torch import fx

from moeify.passes import activation
from moeify.passes.atoms import MUL_TARGETS
from moeify.passes.capture import Captured
from moeify.passes.rules.common import Candidate, common_check, first_input, linear_ref, skip_back

NAME = "gated"
REWRITES = ("module", "forward")


def _branches(mul: fx.Node, cap: Captured):
    """Both orders of the product's operands, each walked back over casts."""
    if mul.op != "call_function" or mul.target not in MUL_TARGETS or len(mul.args) != 2:
        return []
    a, b = mul.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return []
    return [(skip_back(a, cap), skip_back(b, cap)), (skip_back(b, cap), skip_back(a, cap))]


def pattern(down: fx.Node, cap: Captured) -> Candidate | None:
    down_ref = linear_ref(down, cap)
    if down_ref is None:
        return None
    mul, between = skip_back(first_input(down), cap)
    if mul is None:
        return None
    for (end, act_casts), (up, up_casts) in _branches(mul, cap):
        up_ref = linear_ref(up, cap)
        act = activation.find(end, cap) if up_ref is not None else None
        if act is None or act.entry is up:
            continue
        gate = act.entry
        gate_ref = linear_ref(gate, cap)
        x = first_input(up)
        if x is None or first_input(gate) is not x:
            continue
        body = [
            gate,
            *act.passes,
            *act.nodes,
            *reversed(act_casts),
            up,
            *reversed(up_casts),
            mul,
            *reversed(between),
            down,
        ]
        return Candidate(
            NAME,
            cap,
            x,
            down,
            down_ref,
            up,
            up_ref,
            act.end,
            act.name,
            act.display,
            gate=gate,
            gate_ref=gate_ref,
            body=body,
            act_found=act,
        )
    return None


def check(c: Candidate) -> str | None:
    if not (c.gate_ref.out_features == c.up_ref.out_features == c.down_ref.in_features):
        return (
            f"gate ({c.gate_ref.out_features}), up ({c.up_ref.out_features}) and down input "
            f"({c.down_ref.in_features}) widths differ [{c.label}]"
        )
    if c.gate_ref.in_features != c.up_ref.in_features:
        return f"gate and up projections take different widths [{c.label}]"
    return common_check(c)
