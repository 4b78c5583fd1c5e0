"""The surgery plan: which surgery replaces a found FFN, chosen once (by analyse, before anything is
changed) as a frozen object that rewrite.py executes as it stands.

Three surgeries, tried in the rule's order of preference (see rules/*.REWRITES):

- `ModuleSurgery` ("module"): the traced module computes the FFN and nothing else (LlamaMLP, GPT2MLP,
  T5DenseActDense, a Sequential(Linear, act, Linear) inside a model): the module is swapped for an
  MoELayer (or a thin adapter when its call takes more than x or ends in a dropout).
- `ChainSurgery` ("chain"): up, activation and down are separate atoms whose values feed only each
  other (BERT's intermediate/output split, TransformerEncoderLayer, ALBERT): the down projection becomes
  the MoELayer taking the D-wide input, the up projection and activation become pass-throughs.
  Everything around them -- residuals, LayerNorms, the dropout after the FFN -- is untouched.
- `ForwardSurgery` ("forward"): anything else that traced faithfully (an FFN written with F.linear on
  parameters inside a bigger forward): the traced method is regenerated with the FFN replaced by a call
  to an MoELayer registered on the module.

Each `*_surgery(candidate)` returns (surgery, None) or (None, the reason it does not apply); `choose`
returns the first that applies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from moeify.passes.atoms import pass_through_kind
from moeify.passes.rules.common import Candidate


# What each surgery promises (`preserves_computation`): with an MoELayer that computes the dense FFN
# (copy + renormalised top-k), the model computes what it did, in eval mode. (In training, dropout
# between activation and down projection is gone.) tests/passes/test_pass_promises.py holds each to it.


@dataclass(frozen=True)
class ModuleSurgery:
    """Swap the FFN's whole module for the MoELayer.

    x_index, x_name: where the FFN's input arrives in the module's call (position, keyword).
    trailing: the dropouts after the FFN, kept: a submodule path (relative to the module) or the rate
        of a functional dropout.
    bare: the MoELayer can stand in the module's place as it is (x first and only, no trailing dropout);
        otherwise an adapter (`MoEBlock`) takes the call.
    """

    name: ClassVar[str] = "module"
    preserves_computation: ClassVar[bool] = True
    x_index: int
    x_name: str
    trailing: tuple[str | float, ...] = ()
    bare: bool = True


@dataclass(frozen=True)
class ChainSurgery:
    """The down projection's module becomes the MoELayer; the modules in `identities` (the up
    projection first, then the activation and dropout modules between) become pass-throughs, and each
    (module, attribute) in `functions` holding the activation function gets the identity function.
    Paths are relative to the traced module."""

    name: ClassVar[str] = "chain"
    preserves_computation: ClassVar[bool] = True
    down: str
    identities: tuple[str, ...]
    functions: tuple[tuple[nn.Module, str], ...] = ()


@dataclass(frozen=True)
class ForwardSurgery:
    """Regenerate the traced method with the FFN's nodes replaced by a call to the MoELayer."""

    name: ClassVar[str] = "forward"
    preserves_computation: ClassVar[bool] = True


Surgery = ModuleSurgery | ChainSurgery | ForwardSurgery
SURGERIES: tuple[type, ...] = (ModuleSurgery, ChainSurgery, ForwardSurgery)


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


def module_surgery(c: Candidate) -> tuple[ModuleSurgery | None, str | None]:
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
    dropouts = tuple(n.target if n.op == "call_module" else _dropout_p(n) for n in trailing)
    if any(d is None for d in dropouts):
        return None, "the dropout after the FFN has no constant rate"
    x_index = placeholders.index(c.x)
    bare = x_index == 0 and not dropouts and len(placeholders) == 1
    return ModuleSurgery(x_index=x_index, x_name=c.x.target, trailing=dropouts, bare=bare), None


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


def chain_surgery(c: Candidate) -> tuple[ChainSurgery | None, str | None]:
    # A graph traced with fixed flags is fine here: the surgery swaps atoms and never runs the graph,
    # and the FFN's own data flow does not depend on a layer's flags.
    cap = c.cap
    if c.up.op != "call_module" or c.down.op != "call_module":
        return None, "its projections are not modules"
    if c.shape_reads:  # the up projection becomes a pass-through: the hidden values would be D wide
        return None, f"the hidden values' shape is read outside the FFN ({c.shape_reads[0].name})"
    calls = [n.target for n in cap.graph.nodes if n.op == "call_module"]
    for node in (c.up, c.down) + ((c.act,) if c.act.op == "call_module" else ()):
        if calls.count(node.target) != 1:
            return None, f"{cap.full(node.target)} is called more than once"
    identities, functions = [c.up.target], []
    for node in c.body:
        if node in (c.up, c.down):
            continue
        if node is c.act:
            if node.op == "call_module":
                identities.append(node.target)
            elif node.op == "call_function" and (owner := function_owner(c, node.target)) is not None:
                functions.append(owner)
            else:
                return None, "the activation is called directly in code, not through an attribute"
        elif c.act_found is not None and node in c.act_found.nodes:
            return None, "the activation is several operations in code, not one module or function"
        elif pass_through_kind(node, cap.modules) == "dropout":
            if node.op == "call_module":
                identities.append(node.target)
            elif _dropout_p(node) != 0:  # p=0 (BART's default activation_dropout) does nothing anywhere
                return None, f"a functional dropout (p={_dropout_p(node)}) sits between the projections"
        # casts stay: applied to the D-wide input they change nothing
    return ChainSurgery(down=c.down.target, identities=tuple(identities), functions=tuple(functions)), None


def forward_surgery(c: Candidate) -> tuple[ForwardSurgery | None, str | None]:
    cap = c.cap
    if cap.concrete:
        return None, "its module traced only with fixed defaults"
    if cap.decided:  # the regenerated code would keep only the branch taken on today's device and dtype
        return None, f"its code branches on tensor metadata ({cap.decided[0]})"
    body = set(c.body)
    for node in cap.graph.nodes:
        if (
            node.op == "call_module"
            and node not in body
            and node.target in {b.target for b in body if b.op == "call_module"}
        ):
            return None, f"{cap.full(node.target)} is also called outside the FFN"
    return ForwardSurgery(), None


_CHOOSERS = {"module": module_surgery, "chain": chain_surgery, "forward": forward_surgery}


def choose(c: Candidate, rule) -> tuple[Surgery | None, str | None]:
    """The first surgery of the rule's preference that applies, or (None, the reasons)."""
    reasons = []
    for name in rule.REWRITES:
        surgery, why = _CHOOSERS[name](c)
        if surgery is not None:
            return surgery, None
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons)
