"""moeify.SoftExperts: Soft MoE's experts (routers whose routing is a `SoftRouting`).

    moeify.SoftExperts(x, dispatch, combine, w1, b1?, w2, b2?) -> y
    x [T, D]; dispatch, combine [T, E*S]. slots = dispatch^T x viewed [E, S, D]; each expert runs on its
    own S slots; y = combine @ (slot outputs viewed [E*S, D]). Attributes as moeify.GroupedFFN's.

Torch side: the export-only op `moeify::export_soft_experts`, so the expert computation lowers to this one
node instead of an unrolled per-expert loop. Its eager body is the reference (correct if ever run, no
autograd); its fake kernel gives torch.export the output shape.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema

from moeify.dispatch.reference import reference_soft_experts
from moeify.lowering.ops import portable
from moeify.lowering.ops.base import Lowering
from moeify.routers.base import SOFT_EXPERTS

Tensor = torch.Tensor


@torch.library.custom_op("moeify::export_soft_experts", mutates_args=())
def export_soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None,
                        w2: Tensor, b2: Tensor | None, activation: str, gated: bool) -> Tensor:
    """x [T, D], dispatch/combine [T, E*S] (same dtype as x) -> [T, D]."""
    with torch.no_grad():
        return reference_soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation, gated)


@export_soft_experts.register_fake
def _(x, dispatch, combine, w1, b1, w2, b2, activation, gated):
    return torch.empty_like(x)



def experts(layer, x: Tensor, routing) -> Tensor:
    """x [T, D], a SoftRouting -> [T, D] as one moeify::export_soft_experts."""
    cfg = layer.config
    w1, w2 = layer.expert_weights()  # [E, H1, D], [E, D, H]
    return export_soft_experts(x, routing.dispatch.to(x.dtype), routing.combine.to(x.dtype), w1,
                               layer.b1, w2, layer.b2, cfg.activation, cfg.gated)  # [T, D]


def translate(x, dispatch, combine, w1, b1, w2, b2, activation: str, gated: bool):
    moe_ops = onnxscript.values.Opset(portable.DOMAIN, portable.VERSION)
    return moe_ops.SoftExperts(x, dispatch, combine, w1, b1, w2, b2, activation=activation, gated=int(gated))


def schema() -> OpSchema:
    return OpSchema(
        "SoftExperts", portable.DOMAIN, portable.VERSION,
        "Soft MoE: experts run on slots mixed from all tokens, outputs mixed back; see moeify docs.",
        inputs=[
            portable.param("x", "T", "[T, D] tokens"),
            portable.param("dispatch", "T", "[T, E*S] dispatch weights (columns sum to 1)"),
            portable.param("combine", "T", "[T, E*S] combine weights (rows sum to 1)"),
            *portable.expert_weights(),
        ],
        outputs=[portable.param("y", "T", "[T, D]")],
        type_constraints=[("T", portable.FLOATS, "float tensors")],
        attributes=portable.expert_attrs(),
    )


def body(activation: str, gated: bool, has_b1: bool, has_b2: bool, opset: int) -> ir.Function:
    """The standard-op body of moeify.SoftExperts for one variant."""
    b = portable.Builder()
    formal = portable.inputs("x", "dispatch", "combine", "w1", "b1", "w2", "b2")
    x, dispatch, combine, w1, b1, w2, b2 = formal
    E = b("Shape", w1, start=0, end=1)  # [1]
    D = b("Shape", x, start=1, end=2)  # [1]
    slots = b("MatMul", b("Transpose", dispatch, perm=[1, 0]), x)  # [E*S, D]
    slots = b("Reshape", slots, b("Concat", E, b.ints([-1]), D, axis=0))  # [E, S, D]
    y = portable.experts_body(b, slots, w1, b1 if has_b1 else None, w2, b2 if has_b2 else None, activation,
                              gated)
    y = b("Reshape", y, b("Concat", b.ints([-1]), D, axis=0))  # [E*S, D]
    out = b("MatMul", combine, y)  # [T, D]
    overload = portable.overload_name(activation, gated, has_b1, has_b2)
    return portable.function("SoftExperts", overload, formal, out, b, opset)


LOWERING = Lowering(
    name=SOFT_EXPERTS,
    eligible=portable.named_activation_only,
    experts=experts,
    translations=lambda: {torch.ops.moeify.export_soft_experts.default: translate},
    schema=schema,
    body=body,
    bias_inputs=(4, 6),
)
