"""Which surgery can replace a found FFN, decided before anything is changed.

Three surgeries, tried in the rule's order of preference (see rules/*.REWRITES):

- "module": the traced module computes the FFN and nothing else (LlamaMLP, GPT2MLP, T5DenseActDense,
  a Sequential(Linear, act, Linear) inside a model): the module is swapped for an MoELayer (or a thin
  adapter when its call takes more than x or ends in a dropout).
- "chain": up, activation and down are separate atoms whose values feed only each other (BERT's
  intermediate/output split, TransformerEncoderLayer, ALBERT): the down projection becomes the MoELayer
  taking the D-wide input, the up projection and activation become pass-throughs. Everything around
  them -- residuals, LayerNorms, the dropout after the FFN -- is untouched and runs as before.
- "forward": anything else that traced faithfully (an FFN written with F.linear on parameters inside a
  bigger forward): the traced method is regenerated with the FFN replaced by a call to an MoELayer
  registered on the module.

Each `*_details` returns (details, None) or (None, reason); `choose` returns the first that applies.
"""

from __future__ import annotations

import functools

from torch import fx

from moeify.passes.atoms import pass_through_kind
from moeify.passes.rules.common import Candidate


def _pure_helpers(graph: fx.Graph, keep: set) -> set:
    """get_attr / getattr nodes (no side effects) whose users are all in `keep` or other helpers."""
    helpers: set = set()
    for node in reversed(graph.nodes):
        pure = node.op == "get_attr" or (node.op == "call_function" and node.target is getattr)
        if pure and all(u in keep or u in helpers for u in node.users):
            helpers.add(node)
    return helpers


def trailing_dropouts(c: Candidate) -> list[fx.Node]:
    """Dropouts applied to the FFN's output, in order (kept by the module surgery)."""
    out, node = [], c.down
    while len(node.users) == 1:
        (user,) = node.users
        if pass_through_kind(user, c.cap.modules) != "dropout":
            break
        out.append(user)
        node = user
    return out


def module_details(c: Candidate):
    cap = c.cap
    if cap.concrete:
        return None, "its module traced only with fixed defaults"
    if cap.method != "forward":
        return None, f"it lives in method {cap.method}, not in a module of its own"
    if not cap.path:
        return None, "the FFN module is the model itself"
    graph = cap.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if c.x.op != "placeholder":
        return None, "the module computes the FFN's input itself"
    if any(p.users for p in placeholders if p is not c.x):
        return None, "the module uses inputs besides the FFN's"
    trailing = trailing_dropouts(c)
    last = trailing[-1] if trailing else c.down
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not last:
        return None, "the module returns more than the FFN's output"
    keep = set(c.body) | set(trailing) | set(placeholders) | {output}
    extra = [n for n in graph.nodes if n not in keep and n not in _pure_helpers(graph, keep)]
    if extra:
        return None, f"the module computes more than the FFN ({', '.join(n.name for n in extra[:3])})"
    if any(n.op == "call_function" and not _dropout_p(n) for n in trailing):
        return None, "the dropout after the FFN has no constant rate"
    return {"x_index": placeholders.index(c.x), "x_name": c.x.target, "trailing": trailing}, None


def _dropout_p(node: fx.Node) -> float | None:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    return p if isinstance(p, (int, float)) else None


def function_owner(c: Candidate, fn) -> tuple | None:
    """(module, attribute) holding the activation function `fn` that the traced code called, if unique."""
    owners = []
    for m in c.cap.module.modules():
        for attr, value in vars(m).items():
            if attr.startswith("_"):
                continue
            same = value is fn or (
                isinstance(value, functools.partial)
                and isinstance(fn, functools.partial)
                and value.func is fn.func
                and value.keywords == fn.keywords
            )
            if same:
                owners.append((m, attr))
    return owners[0] if len(owners) == 1 else None


def chain_details(c: Candidate):
    # A graph traced with fixed flags is fine here: the surgery swaps atoms and never runs the graph,
    # and the FFN's own data flow does not depend on a layer's flags.
    cap = c.cap
    if c.up.op != "call_module" or c.down.op != "call_module":
        return None, "its projections are not modules"
    calls = [n.target for n in cap.graph.nodes if n.op == "call_module"]
    for node in (c.up, c.down) + ((c.act,) if c.act.op == "call_module" else ()):
        if calls.count(node.target) != 1:
            return None, f"{cap.full(node.target)} is called more than once"
    identities, functions = [c.up], []
    for node in c.body:
        if node in (c.up, c.down):
            continue
        if node is c.act:
            if node.op == "call_module":
                identities.append(node)
            elif node.op == "call_function" and (owner := function_owner(c, node.target)) is not None:
                functions.append(owner)
            else:
                return None, "the activation is called directly in code, not through an attribute"
        elif pass_through_kind(node, cap.modules) == "dropout":
            if node.op == "call_module":
                identities.append(node)
            elif _dropout_p(node) != 0:  # p=0 (BART's default activation_dropout) does nothing anywhere
                return None, f"a functional dropout (p={_dropout_p(node)}) sits between the projections"
        # casts stay: applied to the D-wide input they change nothing
    return {"identities": identities, "functions": functions}, None


def forward_details(c: Candidate):
    cap = c.cap
    if cap.concrete:
        return None, "its module traced only with fixed defaults"
    body = set(c.body)
    for node in cap.graph.nodes:
        if (
            node.op == "call_module"
            and node not in body
            and node.target in {b.target for b in body if b.op == "call_module"}
        ):
            return None, f"{cap.full(node.target)} is also called outside the FFN"
    return {}, None


DETAILS = {"module": module_details, "chain": chain_details, "forward": forward_details}

# What each surgery promises: with an MoELayer that computes the dense FFN (copy + renormalised top-k),
# the model computes what it did, in eval mode. (In training, dropout between activation and down
# projection is gone.) tests/test_convert.py checks each promise on a model that uses the surgery.
PRESERVES_COMPUTATION = {"module": True, "chain": True, "forward": True}


def choose(c: Candidate, rule) -> tuple[str | None, str | None]:
    """The first surgery of the rule's preference that applies, or (None, the reasons)."""
    reasons = []
    for name in rule.REWRITES:
        details, why = DETAILS[name](c)
        if details is not None:
            return name, None
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons)
