"""The activation of an FFN: the elementwise computation between a projection and what consumes it.

`find(end, cap)` walks back from `end` (the node feeding the down projection, or the gate's factor of a
gated product) over elementwise nodes (elementwise.py) to the one linear-like node they all start from.
What it finds is an `Activation`: one node or several (`relu(x) ** 2`, `x * torch.sigmoid(x)` written
inline, a user module traced through), named when moeify's experts know the function (atoms.py for
single nodes, `relu2` for a ReLU squared), "custom" otherwise. `Activation.module()` builds an
nn.Module computing exactly the same thing: a copy of the activation module, or a GraphModule of the
traced nodes carrying copies of the parameters they read. `activation_module` is the public door.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from moeify.activations import CUSTOM
from moeify.passes import elementwise, metadata
from moeify.passes.atoms import activation_of, pass_through_kind
from moeify.passes.linear import linear_ref, skip_back

_MAX_HOPS = 6  # how far back a blocked path is followed to see whether it would have reached a projection


@dataclass
class Activation:
    """What sits between a projection (`entry`) and `end`.

    name: moeify's name ("relu", "relu2", ...), CUSTOM, or None when something on the way is not
    elementwise (then `reason` says what and why). nodes: the elementwise nodes, in graph order, `end`
    last. helpers: parameters and metadata reads they take. passes: casts/dropouts right after entry.
    """

    name: str | None
    display: str
    entry: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    helpers: list[fx.Node] = field(default_factory=list)
    passes: list[fx.Node] = field(default_factory=list)
    reason: str | None = None
    cap: object = None

    @property
    def end(self) -> fx.Node:
        return self.nodes[-1]

    def module(self) -> nn.Module:
        """An nn.Module computing this activation exactly, independent of the model (copies, not views)."""
        if self.name is None:
            raise ValueError(f"not an elementwise activation: {self.reason}")
        if len(self.nodes) == 1 and self.end.op == "call_module":
            return copy.deepcopy(self.cap.modules[self.end.target])
        return _graph_module(self)


def _linear(node: fx.Node, cap) -> bool:
    return linear_ref(node, cap) is not None


def _entry(node: fx.Node, cap) -> tuple[fx.Node, list[fx.Node]] | None:
    """A linear-like node, or pass-throughs (casts, dropouts) down from one: (the linear, the passes)."""
    start, walked = skip_back(node, cap)
    if start is not None and _linear(start, cap):
        return start, list(reversed(walked))
    return None


def _reaches_linear(node: fx.Node, cap) -> fx.Node | None:
    """Follow first inputs back a few steps: the linear-like reached, if any (a blocked path that would
    have made an FFN is worth a reason; one that never meets a projection is not an FFN at all)."""
    for _ in range(_MAX_HOPS):
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr" and not metadata.is_derived(n)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
        if _linear(node, cap):
            return node
    return None


def find(end: fx.Node | None, cap, entry_of=_entry, width: int | None = None) -> Activation | None:
    """The activation ending at `end`, or None when `end` is not one (no single projection feeds it).

    entry_of(node) -> (entry, passes) or None says where the activation starts (by default: a linear-like,
    past casts and dropouts); width is the entry's feature count (by default the linear-like's)."""
    if end is None or entry_of(end, cap) is not None:
        return None  # nothing between the projection and its consumer: no activation
    nodes, helpers, entries, passes = set(), set(), set(), []
    stack = [end]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        entry = entry_of(node, cap)
        if entry is not None:
            entries.add(entry[0])
            passes += [p for p in entry[1] if p not in passes]
            continue
        unknown_module = node.op == "call_module" and not activation_of(node, cap.modules)[0]
        if unknown_module and _reaches_linear(node, cap) is None:
            return None  # an unknown module on a path from no projection: not worth tracing it
        data, extra, why = elementwise.check(node, cap)
        if why is not None:
            linear = _reaches_linear(node, cap)
            if linear is None:
                return None
            what = elementwise.describe(node, cap)
            return Activation(None, what, linear, [end], reason=f"{what} is not elementwise: {why}", cap=cap)
        nodes.add(node)
        helpers.update(_with_sources(extra))
        stack.extend(data)
    if len(entries) != 1:
        return None  # two projections meet (a gated product) or none: not a plain activation
    (entry,) = entries
    order = {n: i for i, n in enumerate(cap.graph.nodes)}
    ordered = sorted(nodes, key=order.__getitem__)
    if all(_affine(n) for n in ordered):
        return None  # scaling, shifting, casting: a linear map, not an activation
    width = width if width is not None else _width(entry, cap)
    why = _helpers_fit(helpers, ordered, entry, passes, width, cap)
    if why is not None:
        return Activation(None, "", entry, ordered, reason=why, cap=cap)
    name, display = _name(ordered, cap)
    return Activation(name, display, entry, ordered, sorted(helpers, key=order.__getitem__), passes, cap=cap)


def _width(entry: fx.Node, cap) -> int:
    return linear_ref(entry, cap).out_features


_AFFINE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos, torch.add,
           torch.sub, torch.mul, torch.div, "add", "sub", "mul", "div", "neg"}


def _affine(node: fx.Node) -> bool:
    """A cast, or arithmetic with at most one computed operand (x * 2, x + bias): linear in x."""
    if node.op == "call_method" and pass_through_kind(node, {}) == "cast":
        return True
    if node.op not in ("call_function", "call_method") or node.target not in _AFFINE:
        return False
    computed = [n for n in node.all_input_nodes if n.op != "get_attr" and not metadata.is_derived(n)]
    return len(computed) <= 1


def _with_sources(helpers) -> set:
    """Metadata helpers with the metadata nodes they are computed from (h.shape[-1]: the shape read too)."""
    out, stack = set(), list(helpers)
    while stack:
        h = stack.pop()
        if h in out:
            continue
        out.add(h)
        if h.op != "get_attr" and not metadata.is_read(h):
            stack.extend(h.all_input_nodes)
    return out


def _helpers_fit(helpers, nodes, entry, passes, width: int, cap) -> str | None:
    """Parameters broadcast along the hidden width only; metadata is read off the activation's tensors."""
    own = set(nodes) | {entry, *passes}
    for h in helpers:
        if h.op == "get_attr":
            t = operator.attrgetter(h.target)(cap.module)
            if t.numel() != 1 and tuple(t.shape) != (width,):
                shape = tuple(t.shape)
                return f"{h.target} has shape {shape}: neither one value nor one per hidden feature ({width})"
        elif metadata.is_read(h) and h.args[0] not in own:
            return f"it reads the metadata of {h.args[0].name}, a tensor outside the activation"
    return None


def _is_square(node: fx.Node, of: fx.Node) -> bool:
    """node = of ** 2, of * of, torch.square(of)."""
    args = node.args
    if node.target in (torch.square, "square"):
        return args[0] is of and len(args) == 1
    if node.target in (operator.pow, torch.pow, "pow"):
        return args[0] is of and len(args) == 2 and args[1] == 2
    if node.target in (operator.mul, torch.mul, "mul"):
        return len(args) == 2 and args[0] is of and args[1] is of
    return False


def _name(nodes: list[fx.Node], cap) -> tuple[str, str]:
    shown = " -> ".join(elementwise.describe(n, cap) for n in nodes)
    if len(nodes) == 1:
        known, name, display = activation_of(nodes[0], cap.modules)
        return (name, display) if known else (CUSTOM, shown)
    if len(nodes) == 2:
        known, name, _ = activation_of(nodes[0], cap.modules)
        if known and name == "relu" and _is_square(nodes[1], nodes[0]):
            return "relu2", shown
    return CUSTOM, shown


def _graph_module(act: Activation) -> fx.GraphModule:
    """The activation's nodes as a GraphModule of one input; parameters, buffers and modules copied in."""
    cap = act.cap
    graph, root = fx.Graph(), nn.Module()
    x = graph.placeholder("x")
    env = {act.entry: x, **{p: x for p in act.passes}}
    order = {n: i for i, n in enumerate(cap.graph.nodes)}
    for node in sorted([*act.helpers, *act.nodes], key=order.__getitem__):
        if node.op == "get_attr":
            name = f"p{len(root._parameters) + len(root._buffers)}"
            tensor = operator.attrgetter(node.target)(cap.module)
            if isinstance(tensor, nn.Parameter):
                root.register_parameter(name, nn.Parameter(tensor.detach().clone(), tensor.requires_grad))
            else:
                root.register_buffer(name, tensor.detach().clone())
            env[node] = graph.get_attr(name)
        elif node.op == "call_module":
            name = f"m{len(root._modules)}"
            root.add_module(name, copy.deepcopy(cap.modules[node.target]))
            env[node] = graph.call_module(name, *_mapped((node.args, node.kwargs), env))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[act.end])
    return fx.GraphModule(root, graph, class_name="Activation")


def _mapped(value, env):
    return fx.node.map_arg(value, lambda n: env[n])


def activation_module(site) -> nn.Module:
    """An nn.Module computing the activation of a found FFN exactly: what `MoELayer(config, activation=...)`
    takes when `site.match.activation == "custom"`. `site` is a Site of `moeify.passes.analyse(model)`
    (convert has them); call it before the model is rewritten: the module shares nothing with the model.
    `moeify.passes.activation_module(model, match)` takes an FFNMatch of `find_ffns(model)` instead."""
    act = site.cand.act_found
    if act is None:
        raise ValueError(f"{site.match.name}: no activation recorded")
    return act.module()


__all__ = ["Activation", "activation_module", "find"]
