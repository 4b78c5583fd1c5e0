"""Metadata reads: `.device`, `.dtype`, `.shape`, `.size()`, `.dim()`, `.ndim` of a tensor are not uses of
its values.

Three questions the passes ask here:
- is a node a read of a tensor's metadata (or computed from such reads only)? Analysis does not count
  those as uses of an FFN's hidden values;
- can a traced condition on metadata be decided (diffusers' `if gate.device.type != "mps"`)? Capture
  answers from the traced module's own parameters (their device and dtype), so such a module traces;
- which dead metadata nodes (a decided condition leaves its reads behind) can go from a graph.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

READ_ATTRS = frozenset({"device", "dtype", "shape", "ndim", "is_cuda", "is_meta", "layout", "requires_grad"})
READ_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device", "is_floating_point",
                          "is_complex", "element_size", "nelement"})
# plain Python on metadata values (comparisons, indexing a shape, `.type` of a device): no tensor values read
_ON_METADATA = frozenset({getattr, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le,
                          operator.gt, operator.ge, operator.not_, operator.and_, operator.or_, operator.is_,
                          operator.is_not, operator.contains, operator.truth, len, str})


def is_read(node: fx.Node) -> bool:
    """`t.device`, `t.dtype`, `t.shape`, `t.ndim`, ... or `t.size()`, `t.dim()`, ...: a tensor's metadata."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in READ_ATTRS
    return node.op == "call_method" and node.target in READ_METHODS


def is_derived(node: fx.Node) -> bool:
    """A metadata read, or plain Python computed from metadata reads and constants only."""
    if is_read(node):
        return True
    if node.op != "call_function" or node.target not in _ON_METADATA:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(is_derived(n) for n in inputs)


def reads_of(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read only its metadata (directly, e.g. `h.device`)."""
    return [u for u in node.users if is_read(u)]


class Undecidable(Exception):
    """The condition reads something that is not device or dtype metadata."""


def decide(node: fx.Node, device: torch.device, dtype: torch.dtype):
    """The value of a metadata condition, taking every tensor to be on `device` with `dtype`."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("device", "dtype"):
        obj = node.args[0]
        if isinstance(obj, fx.Node) and not is_derived(obj):  # a tensor
            return device if node.args[1] == "device" else dtype
    if node.op == "call_function" and node.target in _ON_METADATA and node.all_input_nodes:
        args = [decide(a, device, dtype) if isinstance(a, fx.Node) else a for a in node.args]
        if node.kwargs:
            raise Undecidable(node.name)
        if node.target is getattr and args[1] not in ("type", "index"):  # only the device's plain fields
            raise Undecidable(node.name)
        return node.target(*args)
    raise Undecidable(node.name)


_SYMBOLS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
            operator.ge: ">=", operator.is_: "is", operator.is_not: "is not"}


def render(node) -> str:
    """A condition as code: `proj.device.type != 'mps'`."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_function" and node.target is getattr:
        return f"{render(node.args[0])}.{node.args[1]}"
    if node.op == "call_function" and node.target in _SYMBOLS and len(node.args) == 2:
        return f"{render(node.args[0])} {_SYMBOLS[node.target]} {render(node.args[1])}"
    return node.name


def home(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module's tensors live: its first floating parameter (or buffer), else CPU and the default."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def drop_dead(graph: fx.Graph) -> None:
    """Erase metadata nodes nothing uses (the reads a decided condition left behind)."""
    for node in reversed(list(graph.nodes)):
        if not node.users and is_derived(node):
            graph.erase_node(node)
