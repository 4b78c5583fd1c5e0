"""Which graph nodes compute elementwise: out[i] depends on in[i] alone, the same function at every position.

Decided conservatively, from lists: torch's unary math and activation functions (and their Tensor-method
and nn.Module forms), binary arithmetic whose other operand is a constant or a parameter broadcasting along
the last dimension only, dtype casts, transformers' activation classes. Any other module counts when its
own forward traces to such operations only. Everything else is not elementwise, and `check` says why.

`check(node, cap)` -> (data inputs, helper inputs, reason): data inputs are the tensors the value flows
from; helpers are parameters and metadata reads the node also takes; reason is None when elementwise.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from moeify.passes import metadata
from moeify.passes.atoms import is_hf_activation, pass_through_kind

_UNARY_NAMES = (
    "abs neg exp exp2 expm1 log log1p log2 log10 sqrt rsqrt square reciprocal sin cos tan sinh cosh tanh "
    "asin acos atan asinh acosh atanh sigmoid erf erfc erfinv relu sign sgn floor ceil round trunc frac "
    "clamp clip clamp_min clamp_max nan_to_num logit positive"
).split()
UNARY_FUNCTIONS: frozenset = frozenset(
    [getattr(torch, n) for n in _UNARY_NAMES if hasattr(torch, n)]
    + [F.relu, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.relu6, F.hardswish,
       F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.softshrink,
       F.hardshrink, F.threshold, F.tanh, F.sigmoid, F.prelu, torch.selu, torch.celu, operator.neg,
       operator.pos, operator.abs]
)
UNARY_METHODS = frozenset(_UNARY_NAMES)
BINARY_FUNCTIONS = frozenset([operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
                              torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum,
                              torch.minimum, torch.true_divide])
BINARY_METHODS = frozenset("add sub mul div pow true_divide maximum minimum __add__ __mul__ __sub__".split())

# torch.nn modules that apply one function at every position (PReLU: only with a single weight)
ELEMENTWISE_MODULES = (nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ReLU6, nn.ELU,
                       nn.SELU, nn.CELU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.PReLU,
                       nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
                       nn.Hardshrink, nn.Threshold)

# why common non-elementwise operations are not: a reason a user can read
_WHY = {
    "softmax": "it normalises along a dimension", "log_softmax": "it normalises along a dimension",
    "layer_norm": "it normalises over the features", "rms_norm": "it normalises over the features",
    "glu": "it halves the features", "chunk": "it splits the features", "split": "it splits the features",
    "cat": "it concatenates tensors", "matmul": "it mixes the features", "bmm": "it mixes the features",
    "linear": "it mixes the features", "sum": "it reduces", "mean": "it reduces", "cumsum": "it accumulates",
    "view": "it reshapes", "reshape": "it reshapes", "transpose": "it moves values",
    "permute": "it moves values", "flatten": "it reshapes", "roll": "it moves values",
    "dropout": "it drops values at random in training",
}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def describe(node: fx.Node, cap) -> str:
    """How a user would name what the node does: `nn.PReLU`, `relu`, `.pow()`, `mul`."""
    if node.op == "call_module":
        return type(cap.modules.get(node.target, nn.Module())).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return _name(node.target)
    return node.op + (f" {node.target}" if node.op != "output" else "")


def _why_not(node: fx.Node) -> str:
    return _WHY.get(_name(node.target).lstrip("_"), "it is not an operation known to be elementwise")


def _helper(arg: fx.Node, cap) -> str | None:
    """None when `arg` may ride along with an elementwise node: a 0-d/1-d parameter, buffer or constant
    (broadcast along the last dimension only), or metadata (`h.dtype`); else why not."""
    if arg.op == "get_attr":
        try:
            t = operator.attrgetter(arg.target)(cap.module)
        except AttributeError:
            return f"{arg.target} is not a tensor of the module"
        if not isinstance(t, torch.Tensor) or t.dim() > 1:
            return f"{arg.target} has {t.dim()} dimensions; only one along the features broadcasts alike"
        return None
    if metadata.is_derived(arg):
        return None
    return "data"  # a tensor computed by the graph: a data input


def check(node: fx.Node, cap) -> tuple[list[fx.Node], list[fx.Node], str | None]:
    """(data inputs, helper inputs, why not elementwise or None)."""
    if node.op == "call_module":
        return _check_module(node, cap)
    if node.op not in ("call_function", "call_method"):
        return [], [], f"{describe(node, cap)} is not a computation"
    target = node.target
    kind = pass_through_kind(node, cap.modules)
    if kind == "dropout":
        return [], [], _WHY["dropout"]
    unary = target in UNARY_METHODS if node.op == "call_method" else target in UNARY_FUNCTIONS
    binary = target in BINARY_METHODS if node.op == "call_method" else target in BINARY_FUNCTIONS
    if not (unary or binary or kind == "cast"):
        return [], [], _why_not(node)
    data, helpers = [], []
    args = list(node.args) + list(node.kwargs.values())
    for i, arg in enumerate(args):
        for n in [a for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(a, fx.Node)]:
            why = _helper(n, cap)
            if why is None:
                helpers.append(n)
            elif why != "data":
                return [], [], why
            elif i == 0 or binary:
                data.append(n)
            else:
                return [], [], f"its argument {n.name} is a computed tensor, not a constant"
    if not data:
        return [], [], "it reads no tensor computed before it"
    return data, helpers, None


def _check_module(node: fx.Node, cap):
    m = cap.modules.get(node.target)
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or len(node.args) + len(node.kwargs) != 1:
        return [], [], "it takes more than one input"
    if isinstance(m, nn.PReLU) and m.num_parameters != 1:
        return [], [], "nn.PReLU with one weight per channel applies it along dim 1, whatever the rank"
    if isinstance(m, ELEMENTWISE_MODULES) or is_hf_activation(m):
        return [x], [], None
    why = module_not_elementwise(m)
    return ([x], [], None) if why is None else ([], [], why)


def module_not_elementwise(m: nn.Module) -> str | None:
    """None when the module's own forward traces to elementwise operations only (on one input); else why."""
    from moeify.passes.capture import Captured

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(m)
    except Exception as exc:  # user code under tracing can fail any way; then we cannot tell
        return f"its forward does not trace ({type(exc).__name__}), so it cannot be shown elementwise"
    metadata.drop_dead(graph)
    cap = Captured("", "forward", graph, m, dict(m.named_modules()))
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return "its forward takes more than one input"
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or metadata.is_derived(n):
            continue
        *_, why = check(n, cap)
        if why is not None:
            return f"its forward calls {describe(n, cap)}: {why}"
    return None
