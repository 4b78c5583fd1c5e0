"""Rule `plain`: down(dropout?(act(up(x)))) -- BERT, GPT-2, T5 v1.0, ViT, nn.TransformerEncoderLayer.

Pattern: a linear-like `down` whose input is, past dropouts and casts, an elementwise activation (one node
or several: activation.py) of a linear-like `up`. Check: the common ones, plus up's width must be down's
input width.
"""

from __future__ import annotations

from torch import fx

from moeify.passes import activation
from moeify.passes.capture import Captured
from moeify.passes.rules.common import Candidate, common_check, first_input, linear_ref, skip_back

NAME = "plain"
REWRITES = ("module", "chain", "forward")


def pattern(down: fx.Node, cap: Captured) -> Candidate | None:
    down_ref = linear_ref(down, cap)
    if down_ref is None:
        return None
    end, between = skip_back(first_input(down), cap)
    act = activation.find(end, cap)
    if act is None:
        return None
    up = act.entry
    up_ref, x = linear_ref(up, cap), first_input(up)
    if x is None:
        return None
    body = [up, *act.passes, *act.nodes, *reversed(between), down]
    return Candidate(NAME, cap, x, down, down_ref, up, up_ref, act.end, act.name, act.display, body=body,
                     act_found=act)


def check(c: Candidate) -> str | None:
    if c.up_ref.out_features != c.down_ref.in_features:
        return (
            f"the up projection gives {c.up_ref.out_features} features but the down projection takes "
            f"{c.down_ref.in_features} [{c.label}]"
        )
    return common_check(c)
