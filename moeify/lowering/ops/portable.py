"""The portable bodies: what moeify's own ops (moeify.GroupedFFN, moeify.SoftExperts) share.

Every moeify op travels *inside each exported model* as an ONNX function (model-local, one overload per
variant) whose body uses standard ai.onnx ops only, so any runtime that supports functions runs the model
without knowing moeify (ONNX Runtime inlines them when it loads the model); the portable target inlines
them at export. This file holds the pieces of those bodies (a node builder, the activations, the batched
expert computation, the function wrapper) and of the ops' schemas (domain "moeify", version 1, the
expert weight inputs and attributes). Each op's own file (`grouped_ffn`, `soft_experts`) holds its
dispatch.

Shape legend: E experts, C rows per expert, D d_model, H1 first-projection width (2H when gated), H hidden.
Bodies are type-polymorphic (float32/float16/...): constants are made float32 and CastLike'd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx.defs import OpSchema

from moeify.errors import MoeifyError

DOMAIN = "moeify"
VERSION = 1
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


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


def named_activation_only(layer, target: str) -> str | None:
    """The eligibility check of moeify's ops (any target): why the op cannot carry `layer`'s activation (its
    attribute is a name), or None."""
    if layer.activation is not None:
        return (f"the activation is a module ({type(layer.activation).__name__}), not one of the named "
                f"activations the op's attribute can carry ({', '.join(ONNX_ACTIVATIONS)})")
    return None


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


def experts_body(b: Builder, slots: ir.Value, w1: ir.Value, b1: ir.Value | None, w2: ir.Value,
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


def inputs(*names: str) -> list[ir.Value]:
    """The formal inputs of a function body."""
    return [ir.Value(name=n) for n in names]


def overload_name(activation: str, gated: bool, has_b1: bool, has_b2: bool) -> str:
    """The function overload of one variant, e.g. "silu_gated_nobias"."""
    bias = {(True, True): "bias", (False, False): "nobias", (True, False): "b1", (False, True): "b2"}
    return f"{activation}{'_gated' if gated else ''}_{bias[(has_b1, has_b2)]}"


def function(name: str, overload: str, formal: list[ir.Value], output: ir.Value, b: Builder,
             opset: int) -> ir.Function:
    """The recorded nodes of `b` as the model-local function moeify.<name> (overload `overload`)."""
    output.name = "y"
    graph = ir.Graph(formal, [output], nodes=b.tape.nodes, opset_imports={"": opset},
                     name=f"{name}_{overload}")
    attrs = [ir.Attr("activation", ir.AttributeType.STRING, None),
             ir.Attr("gated", ir.AttributeType.INT, None)]
    return ir.Function(DOMAIN, name, overload, graph=graph, attributes=attrs)


# --- schema pieces

def param(name: str, type_str: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    if optional:
        return OpSchema.FormalParameter(name, type_str, doc,
                                        param_option=OpSchema.FormalParameterOption.Optional)
    return OpSchema.FormalParameter(name, type_str, doc)


def optional_attr(name: str, default, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def expert_attrs() -> list[OpSchema.Attribute]:
    return [
        OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "expert activation (moeify name)"),
        OpSchema.Attribute("gated", OpSchema.AttrType.INT, "1: act(gate) * up with [gate; up] rows of w1"),
    ]


def expert_weights() -> list[OpSchema.FormalParameter]:
    return [
        param("w1", "T", "[E, H1, D] first projection (H1 = 2H when gated)"),
        param("b1", "T", "[E, H1]", optional=True),
        param("w2", "T", "[E, D, H] down projection"),
        param("b2", "T", "[E, D]", optional=True),
    ]
