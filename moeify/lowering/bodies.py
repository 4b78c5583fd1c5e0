"""Standard-op (ai.onnx) bodies of moeify's ONNX ops, built as ONNX functions.

Shape legend: T tokens, D d_model, H1 first-projection width (2H when gated), H hidden, E experts,
N assignments, M kept (not dropped) assignments, C capacity (slots per expert), S soft slots per expert.

GroupedFFN is a *sparse* dispatch, never a dense all-experts-on-all-tokens computation:
  1. drop assignments with expert == E (Compress);
  2. slot of each assignment within its expert = running count of that expert so far (one-hot over E,
     CumSum along the assignments); capacity C = the largest expert count (at least 1);
  3. ScatterND the assigned token rows into a zero buffer [E, C, D];
  4. batched MatMul over experts: [E, C, D] x [E, D, H1] -> activation -> [E, C, H] x [E, H, D];
  5. GatherND each assignment's output row back, scale by its weight, ScatterND(add) into [T, D].
The work is E * C rows, C the busiest expert's load: T*k rows when routing is balanced.

Bodies are type-polymorphic (float32/float16/...): constants are made float32 and CastLike'd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from moeify.errors import MoeifyError
from moeify.lowering.schemas import DOMAIN


class Builder:
    """A few conveniences over onnx_ir's Tape: `b("MatMul", a, c)` records a node and returns its output."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()

    def __call__(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes=attributes or None)

    def multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes) -> list[ir.Value]:
        """A node with several outputs; `num_outputs` is also set as an attribute (Split wants it)."""
        attributes = {**attributes, "num_outputs": num_outputs}
        return list(self.tape.op_multi_out(op_type, list(inputs), attributes=attributes,
                                           num_outputs=num_outputs))

    def ints(self, values) -> ir.Value:
        return self("Constant", value=ir.tensor(np.asarray(values, dtype=np.int64)))

    def scalar_like(self, value: float, like: ir.Value) -> ir.Value:
        return self("CastLike", self("Constant", value=ir.tensor(np.asarray(value, dtype=np.float32))), like)

    def zeros_like_shape(self, shape: ir.Value, like: ir.Value) -> ir.Value:
        return self("CastLike", self("ConstantOfShape", shape), like)  # ConstantOfShape: float32 zeros


# --- activations: h -> act(h), one builder per moeify activation name

def _gelu(b: Builder, h: ir.Value) -> ir.Value:  # 0.5 h (1 + erf(h / sqrt 2))
    inner = b("Erf", b("Mul", h, b.scalar_like(1.0 / math.sqrt(2.0), h)))
    return b("Mul", b("Mul", h, b.scalar_like(0.5, h)), b("Add", inner, b.scalar_like(1.0, h)))


def _gelu_tanh(b: Builder, h: ir.Value) -> ir.Value:  # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
    cube = b("Mul", b("Mul", h, h), h)
    inner = b("Add", h, b("Mul", cube, b.scalar_like(0.044715, h)))
    t = b("Tanh", b("Mul", inner, b.scalar_like(math.sqrt(2.0 / math.pi), h)))
    return b("Mul", b("Mul", h, b.scalar_like(0.5, h)), b("Add", t, b.scalar_like(1.0, h)))


def _silu(b: Builder, h: ir.Value) -> ir.Value:
    return b("Mul", h, b("Sigmoid", h))


def _quick_gelu(b: Builder, h: ir.Value) -> ir.Value:
    return b("Mul", h, b("Sigmoid", b("Mul", h, b.scalar_like(1.702, h))))


def _relu2(b: Builder, h: ir.Value) -> ir.Value:
    r = b("Relu", h)
    return b("Mul", r, r)


def _mish(b: Builder, h: ir.Value) -> ir.Value:  # h tanh(softplus(h)) (Mish is opset 18)
    return b("Mul", h, b("Tanh", b("Softplus", h)))


def _hardswish(b: Builder, h: ir.Value) -> ir.Value:  # h relu6(h + 3) / 6
    return b("Mul", h, _hardsigmoid(b, h))


def _hardsigmoid(b: Builder, h: ir.Value) -> ir.Value:  # relu6(h + 3) / 6: torch's slope, not ONNX's 0.2
    return b("HardSigmoid", h, alpha=1.0 / 6.0, beta=0.5)


ONNX_ACTIVATIONS: dict[str, Callable[[Builder, ir.Value], ir.Value]] = {
    "relu": lambda b, h: b("Relu", h),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": _silu,
    "quick_gelu": _quick_gelu,
    "identity": lambda b, h: b("Identity", h),
    "relu2": _relu2,
    "tanh": lambda b, h: b("Tanh", h),
    "sigmoid": lambda b, h: b("Sigmoid", h),
    "mish": _mish,
    "elu": lambda b, h: b("Elu", h, alpha=1.0),
    "selu": lambda b, h: b("Selu", h),  # ONNX's default alpha and gamma are torch's constants
    "leaky_relu": lambda b, h: b("LeakyRelu", h, alpha=0.01),
    "softplus": lambda b, h: b("Softplus", h),  # torch turns linear above 20: equal in float32
    "hardswish": _hardswish,
    "hardsigmoid": _hardsigmoid,
    "relu6": lambda b, h: b("Clip", h, b.scalar_like(0.0, h), b.scalar_like(6.0, h)),
    "softsign": lambda b, h: b("Softsign", h),
}


def _activate(b: Builder, h: ir.Value, activation: str, gated: bool) -> ir.Value:
    """h [..., H1] -> [..., H]; gated: act(h[..., :H]) * h[..., H:]."""
    if activation not in ONNX_ACTIVATIONS:
        known = ", ".join(ONNX_ACTIVATIONS)
        raise MoeifyError(f"activation {activation!r} has no ONNX lowering; known: {known}")
    act = ONNX_ACTIVATIONS[activation]
    if not gated:
        return act(b, h)
    gate, up = b.multi("Split", h, num_outputs=2, axis=-1)
    return b("Mul", act(b, gate), up)


def _experts(b: Builder, slots: ir.Value, w1: ir.Value, b1: ir.Value | None, w2: ir.Value,
             b2: ir.Value | None, activation: str, gated: bool) -> ir.Value:
    """slots [E, C, D] -> [E, C, D]: every expert on its own C rows (batched MatMul over E)."""
    h = b("MatMul", slots, b("Transpose", w1, perm=[0, 2, 1]))  # [E, C, H1]
    if b1 is not None:
        h = b("Add", h, b("Unsqueeze", b1, b.ints([1])))  # + [E, 1, H1]
    a = _activate(b, h, activation, gated)  # [E, C, H]
    y = b("MatMul", a, b("Transpose", w2, perm=[0, 2, 1]))  # [E, C, D]
    if b2 is not None:
        y = b("Add", y, b("Unsqueeze", b2, b.ints([1])))  # + [E, 1, D]
    return y


def _value(name: str) -> ir.Value:
    return ir.Value(name=name)


def overload_name(activation: str, gated: bool, has_b1: bool, has_b2: bool) -> str:
    """The function overload of one variant, e.g. "silu_gated_nobias"."""
    bias = {(True, True): "bias", (False, False): "nobias", (True, False): "b1", (False, True): "b2"}
    return f"{activation}{'_gated' if gated else ''}_{bias[(has_b1, has_b2)]}"


def _function(name: str, overload: str, inputs: list[ir.Value], output: ir.Value, b: Builder,
              opset: int) -> ir.Function:
    output.name = "y"
    graph = ir.Graph(inputs, [output], nodes=b.tape.nodes, opset_imports={"": opset},
                     name=f"{name}_{overload}")
    attrs = [ir.Attr("activation", ir.AttributeType.STRING, None),
             ir.Attr("gated", ir.AttributeType.INT, None)]
    return ir.Function(DOMAIN, name, overload, graph=graph, attributes=attrs)


def grouped_ffn_function(activation: str, gated: bool, has_b1: bool, has_b2: bool, opset: int) -> ir.Function:
    """The body of moeify.GroupedFFN for one (activation, gated, biases) variant."""
    b = Builder()
    names = ["x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2"]
    x, token_idx, expert_idx, weight, w1, b1, w2, b2 = inputs = [_value(n) for n in names]
    E = b("Shape", w1, start=0, end=1)  # [1]
    D = b("Shape", x, start=1, end=2)  # [1]
    keep = b("Less", expert_idx, E)  # [N] not dropped
    tok = b("Compress", token_idx, keep, axis=0)  # [M]
    exp = b("Compress", expert_idx, keep, axis=0)  # [M]
    wgt = b("Compress", weight, keep, axis=0)  # [M]
    experts = b("Range", b.ints(0), b("Squeeze", E, b.ints([0])), b.ints(1))  # [E]
    one_hot = b("Cast", b("Equal", b("Unsqueeze", exp, b.ints([1])), experts), to=ir.DataType.INT64)  # [M, E]
    running = b("CumSum", one_hot, b.ints(0))  # [M, E] count of each expert up to and including row m
    slot = b("Sub", b("ReduceSum", b("Mul", running, one_hot), b.ints([1]), keepdims=0), b.ints(1))  # [M]
    counts = b("ReduceSum", one_hot, b.ints([0]), keepdims=0)  # [E]
    capacity = b("Max", b("ReduceMax", counts, keepdims=1), b.ints([1]))  # [1] C
    where = b("Concat", b("Unsqueeze", exp, b.ints([1])), b("Unsqueeze", slot, b.ints([1])), axis=1)  # [M, 2]
    buffer = b.zeros_like_shape(b("Concat", E, capacity, D, axis=0), x)  # [E, C, D]
    buffer = b("ScatterND", buffer, where, b("Gather", x, tok, axis=0))  # [E, C, D]
    y = _experts(b, buffer, w1, b1 if has_b1 else None, w2, b2 if has_b2 else None, activation, gated)
    rows = b("Mul", b("GatherND", y, where), b("Unsqueeze", b("CastLike", wgt, x), b.ints([1])))  # [M, D]
    # Sum the k contributions of each token in float32: exact enough, and ONNX Runtime's CPU ScatterND has
    # no float16 'add'.
    rows = b("Cast", rows, to=ir.DataType.FLOAT)
    out = b("ScatterND", b("ConstantOfShape", b("Shape", x)), b("Unsqueeze", tok, b.ints([1])), rows,
            reduction="add")  # [T, D] float32
    out = b("CastLike", out, x)
    return _function("GroupedFFN", overload_name(activation, gated, has_b1, has_b2), inputs, out, b, opset)


def soft_experts_function(activation: str, gated: bool, has_b1: bool, has_b2: bool,
                          opset: int) -> ir.Function:
    """The body of moeify.SoftExperts for one variant."""
    b = Builder()
    names = ["x", "dispatch", "combine", "w1", "b1", "w2", "b2"]
    x, dispatch, combine, w1, b1, w2, b2 = inputs = [_value(n) for n in names]
    E = b("Shape", w1, start=0, end=1)  # [1]
    D = b("Shape", x, start=1, end=2)  # [1]
    slots = b("MatMul", b("Transpose", dispatch, perm=[1, 0]), x)  # [E*S, D]
    slots = b("Reshape", slots, b("Concat", E, b.ints([-1]), D, axis=0))  # [E, S, D]
    y = _experts(b, slots, w1, b1 if has_b1 else None, w2, b2 if has_b2 else None, activation, gated)
    y = b("Reshape", y, b("Concat", b.ints([-1]), D, axis=0))  # [E*S, D]
    out = b("MatMul", combine, y)  # [T, D]
    return _function("SoftExperts", overload_name(activation, gated, has_b1, has_b2), inputs, out, b, opset)


FUNCTION_BUILDERS = {"GroupedFFN": grouped_ffn_function, "SoftExperts": soft_experts_function}
# index of (b1, b2) among each op's inputs
BIAS_INPUTS = {"GroupedFFN": (5, 7), "SoftExperts": (4, 6)}
