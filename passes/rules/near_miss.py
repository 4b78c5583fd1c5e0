"""Near misses: for each rule whose pattern matched nowhere in a model, what came closest and what stopped it.

A rejection explains a candidate; a rule that never produced a candidate leaves nothing to explain, and a
user wondering why their SwiGLU is not found sees silence. `near_misses(captured)` says, per silent rule,
how many projections it looked at and the closest structures: a product that does not feed a
projection, a projection fed by something that is not elementwise, a chunk that is not in two halves.
"""

from __future__ import annotations

from torch import fx

from moeify.passes import activation, elementwise
from moeify.passes.atoms import MUL_TARGETS
from moeify.passes.capture import CaptureResult
from moeify.passes.rules import RULES
from moeify.passes.rules.common import first_input, linear_ref, skip_back

_CLOSEST = 3  # candidates shown per rule


def _downs(captured: CaptureResult):
    for cap in captured.graphs:
        for node in cap.graph.nodes:
            ref = linear_ref(node, cap)
            if ref is not None:
                yield cap, node, ref


def _feeder(cap, down: fx.Node) -> tuple[fx.Node | None, str]:
    node, _ = skip_back(first_input(down), cap)
    return node, (elementwise.describe(node, cap) if node is not None else "nothing")


def _why_plain(cap, down, ref) -> str | None:
    node, what = _feeder(cap, down)
    if node is None or node.op in ("placeholder", "get_attr") or linear_ref(node, cap) is not None:
        return None  # reads an input, or two projections in a row: nothing like an FFN
    act = activation.find(node, cap)
    if act is not None and act.reason:
        return f"{ref.where} reads {what}: {act.reason}"
    *_, why = elementwise.check(node, cap)
    return f"{ref.where} reads {what}, not an activation of a projection" + (f" ({why})" if why else "")


def _why_gated(cap, down, ref) -> str | None:
    node, what = _feeder(cap, down)
    if node is None or node.op != "call_function" or node.target not in MUL_TARGETS:
        return None
    sides = [skip_back(a, cap)[0] for a in node.args if isinstance(a, fx.Node)]
    names = [elementwise.describe(s, cap) for s in sides]
    return f"{ref.where} reads a product of {' and '.join(names) or 'constants'}, not act(gate(x)) * up(x)"


def _why_fused(cap, down, ref) -> str | None:
    for node in cap.graph.nodes:
        is_chunk = getattr(node.target, "__name__", node.target) == "chunk"
        if node.op in ("call_method", "call_function") and is_chunk:
            if linear_ref(skip_back(first_input(node), cap)[0], cap) is not None:
                return f"{cap.site}: {node.name} chunks a projection, not as act(first half) * second half"
    return None


_EXPLAIN = {"plain": _why_plain, "gated": _why_gated, "fused_gated": _why_fused}
_MISSING = {
    "plain": "no projection reads an elementwise activation of another projection",
    "gated": "no projection reads a product act(gate(x)) * up(x)",
    "fused_gated": "no projection is chunked in two halves gating each other",
}


def near_misses(captured: CaptureResult) -> list[str]:
    """One line per rule that matched nowhere: what it looked at and the closest candidates."""
    downs = list(_downs(captured))
    fired = {rule.NAME for rule in RULES for cap, node, _ in downs if rule.pattern(node, cap) is not None}
    lines = []
    for rule in RULES:
        if rule.NAME in fired:
            continue
        explain = _EXPLAIN.get(rule.NAME)
        closest: list[str] = []
        for cap, node, ref in downs:
            why = explain(cap, node, ref) if explain else None
            if why and why not in closest:
                closest.append(why)
            if len(closest) == _CLOSEST:
                break
        looked = len({ref.weight for _, _, ref in downs})  # one projection shows in several graphs
        head = f"rule {rule.NAME!r} matched nothing (looked at {looked} linear-like nodes)"
        missing = _MISSING.get(rule.NAME, "no candidate")
        detail = ("; closest: " + " | ".join(closest)) if closest else f": {missing}"
        lines.append(head + detail)
    return lines
