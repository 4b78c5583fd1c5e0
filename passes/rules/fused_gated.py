"""Rule `fused_gated`: one matrix holds [gate; up] -- Phi-3's `gate_up_proj` then `.chunk(2, dim=-1)`.

Pattern: down(act(g) * u) where g, u = chunk(linear(x), 2, dim=-1), g first. Its rows [0, H) are the
gate and [H, 2H) the up projection: exactly moeify's stacked w1 layout.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from moeify.passes import activation
from moeify.passes.capture import Captured
from moeify.passes.rules.common import Candidate, common_check, first_input, linear_ref, skip_back
from moeify.passes.rules.gated import _branches

NAME = "fused_gated"
REWRITES = ("module", "forward")


def _chunk_part(node: fx.Node | None) -> tuple[fx.Node, int] | None:
    """getitem(chunk(t, 2, dim=-1), i) -> (the chunk node, i)."""
    if node is None or node.op != "call_function" or node.target is not operator.getitem:
        return None
    chunk, index = node.args
    if not isinstance(chunk, fx.Node):
        return None
    is_chunk = (chunk.op == "call_method" and chunk.target == "chunk") or (
        chunk.op == "call_function" and chunk.target is torch.chunk
    )
    if not is_chunk:
        return None
    pieces = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if pieces != 2 or dim != -1:
        return None
    return chunk, index


def _gate_part_of(chunk: fx.Node):
    """An activation's entry finder: the first half of `chunk` (past casts)."""

    def entry_of(node: fx.Node, cap: Captured):
        part, walked = skip_back(node, cap)
        g = _chunk_part(part)
        return (part, list(reversed(walked))) if g is not None and g == (chunk, 0) else None

    return entry_of


def pattern(down: fx.Node, cap: Captured) -> Candidate | None:
    down_ref = linear_ref(down, cap)
    if down_ref is None:
        return None
    mul, between = skip_back(first_input(down), cap)
    if mul is None:
        return None
    for (end, act_casts), (up_part, up_casts) in _branches(mul, cap):
        u = _chunk_part(up_part)
        if u is None or u[1] != 1:
            continue
        chunk = u[0]
        fused, fused_casts = skip_back(first_input(chunk), cap)
        ref = linear_ref(fused, cap)
        if ref is None or ref.out_features % 2:
            continue
        h = ref.out_features // 2
        act = activation.find(end, cap, entry_of=_gate_part_of(chunk), width=h)
        if act is None or act.name is None:
            continue
        gate_part = act.entry
        gate_ref = dataclasses.replace(ref, out_features=h, rows=(0, h))
        up_ref = dataclasses.replace(ref, out_features=h, rows=(h, 2 * h))
        x = first_input(fused)
        if x is None:
            continue
        body = [
            fused,
            *reversed(fused_casts),
            chunk,
            gate_part,
            *act.passes,
            *act.nodes,
            *reversed(act_casts),
            up_part,
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
            fused,
            up_ref,
            act.end,
            act.name,
            act.display,
            gate=fused,
            gate_ref=gate_ref,
            body=body,
            act_found=act,
        )
    return None


def check(c: Candidate) -> str | None:
    if c.up_ref.out_features != c.down_ref.in_features:
        return (
            f"the fused projection's halves ({c.up_ref.out_features}) do not match down's input [{c.label}]"
        )
    return common_check(c)
