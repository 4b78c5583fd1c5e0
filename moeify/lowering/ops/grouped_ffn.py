"""moeify.GroupedFFN: sparse dispatch of (token, expert, weight) assignments; any sparse router.

    moeify.GroupedFFN(x, token_idx, expert_idx, weight, w1, b1?, w2, b2?) -> y
    x [T, D]; token_idx, expert_idx, weight [N] (one row per token-expert assignment; expert_idx == E means
    dropped); w1 [E, H1, D], b1 [E, H1], w2 [E, D, H], b2 [E, D].
    y[t] = sum over n with token_idx[n] = t, expert_idx[n] < E of weight[n] * expert_{expert_idx[n]}(x[t]),
    expert_e(v) = w2[e] @ act(w1[e] @ v + b1[e]) + b2[e]; gated: act(gate) * up with gate = rows [0, H) and
    up = rows [H, 2H) of the first projection. Attributes: activation (a moeify activation name), gated.

Torch side: the router's own ops (standard ONNX) produce the assignments, then `moeify::grouped_ffn` (the
dispatch op, `moeify.dispatch.ops`) becomes this node.

Body (standard ops), shape legend as above plus M kept assignments, C capacity (slots per expert). A
*sparse* dispatch, never a dense all-experts-on-all-tokens computation:
  1. drop assignments with expert == E (Compress);
  2. slot of each assignment within its expert = running count of that expert so far (one-hot over E,
     CumSum along the assignments); capacity C = the largest expert count (at least 1);
  3. ScatterND the assigned token rows into a zero buffer [E, C, D];
  4. batched MatMul over experts: [E, C, D] x [E, D, H1] -> activation -> [E, C, H] x [E, H, D];
  5. GatherND each assignment's output row back, scale by its weight, ScatterND(add) into [T, D].
The work is E * C rows, C the busiest expert's load: T*k rows when routing is balanced.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema

import moeify.dispatch.ops  # noqa: F401  (registers torch.ops.moeify.grouped_ffn)
from moeify.lowering.ops import portable
from moeify.lowering.ops.base import Lowering
from moeify.routers.base import GROUPED_FFN

Tensor = torch.Tensor



def experts(layer, x: Tensor, routing) -> Tensor:
    """x [T, D], a SparseRouting -> [T, D] as one moeify::grouped_ffn."""
    cfg = layer.config
    w1, w2 = layer.expert_weights()  # [E, H1, D], [E, D, H]
    return torch.ops.moeify.grouped_ffn(x, routing.token_idx, routing.expert_idx, routing.weight.to(x.dtype),
                                        w1, layer.b1, w2, layer.b2, cfg.activation, cfg.gated)


def translate(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation: str, gated: bool):
    moe_ops = onnxscript.values.Opset(portable.DOMAIN, portable.VERSION)
    return moe_ops.GroupedFFN(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation=activation,
                              gated=int(gated))


def schema() -> OpSchema:
    return OpSchema(
        "GroupedFFN", portable.DOMAIN, portable.VERSION,
        "Sparse MoE dispatch over a flat list of (token, expert, weight) assignments; see moeify docs.",
        inputs=[
            portable.param("x", "T", "[T, D] tokens"),
            portable.param("token_idx", "I", "[N] token of each assignment"),
            portable.param("expert_idx", "I", "[N] expert of each assignment (E = dropped)"),
            portable.param("weight", "T", "[N] combine weight of each assignment"),
            *portable.expert_weights(),
        ],
        outputs=[portable.param("y", "T", "[T, D]")],
        type_constraints=[("T", portable.FLOATS, "float tensors"), ("I", ["tensor(int64)"], "indices")],
        attributes=portable.expert_attrs(),
    )


def body(activation: str, gated: bool, has_b1: bool, has_b2: bool, opset: int) -> ir.Function:
    """The standard-op body of moeify.GroupedFFN for one (activation, gated, biases) variant."""
    b = portable.Builder()
    formal = portable.inputs("x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2")
    x, token_idx, expert_idx, weight, w1, b1, w2, b2 = formal
    E = b("Shape", w1, start=0, end=1)  # [1]
    D = b("Shape", x, start=1, end=2)  # [1]
    keep = b("Less", expert_idx, E)  # [N] not dropped
    tok = b("Compress", token_idx, keep, axis=0)  # [M]
    exp = b("Compress", expert_idx, keep, axis=0)  # [M]
    wgt = b("Compress", weight, keep, axis=0)  # [M]
    all_experts = b("Range", b.ints(0), b("Squeeze", E, b.ints([0])), b.ints(1))  # [E]
    is_expert = b("Equal", b("Unsqueeze", exp, b.ints([1])), all_experts)  # [M, E]
    one_hot = b("Cast", is_expert, to=ir.DataType.INT64)  # [M, E]
    running = b("CumSum", one_hot, b.ints(0))  # [M, E] count of each expert up to and including row m
    slot = b("Sub", b("ReduceSum", b("Mul", running, one_hot), b.ints([1]), keepdims=0), b.ints(1))  # [M]
    counts = b("ReduceSum", one_hot, b.ints([0]), keepdims=0)  # [E]
    capacity = b("Max", b("ReduceMax", counts, keepdims=1), b.ints([1]))  # [1] C
    where = b("Concat", b("Unsqueeze", exp, b.ints([1])), b("Unsqueeze", slot, b.ints([1])), axis=1)  # [M, 2]
    buffer = b.zeros_like_shape(b("Concat", E, capacity, D, axis=0), x)  # [E, C, D]
    buffer = b("ScatterND", buffer, where, b("Gather", x, tok, axis=0))  # [E, C, D]
    y = portable.experts_body(b, buffer, w1, b1 if has_b1 else None, w2, b2 if has_b2 else None, activation,
                              gated)
    rows = b("Mul", b("GatherND", y, where), b("Unsqueeze", b("CastLike", wgt, x), b.ints([1])))  # [M, D]
    # Sum the k contributions of each token in float32: exact enough, and ONNX Runtime's CPU ScatterND has
    # no float16 'add'.
    rows = b("Cast", rows, to=ir.DataType.FLOAT)
    out = b("ScatterND", b("ConstantOfShape", b("Shape", x)), b("Unsqueeze", tok, b.ints([1])), rows,
            reduction="add")  # [T, D] float32
    out = b("CastLike", out, x)
    overload = portable.overload_name(activation, gated, has_b1, has_b2)
    return portable.function("GroupedFFN", overload, formal, out, b, opset)


LOWERING = Lowering(
    name=GROUPED_FFN,
    eligible=portable.named_activation_only,
    experts=experts,
    translations=lambda: {torch.ops.moeify.grouped_ffn.default: translate},
    schema=schema,
    body=body,
    bias_inputs=(5, 7),
)
