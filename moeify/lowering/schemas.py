"""ONNX operator schemas moeify emits, registered with `onnx.defs.register_schema`.

onnxscript (which the exporter builds nodes with) looks operators up by (domain, name) in onnx's schema
registry, and `onnx.checker` validates nodes against it, so each op we emit needs a schema here.

Domain "moeify", version 1 (DOMAIN, VERSION below). Every moeify op also travels *inside each exported
model* as an ONNX function (model-local, one overload per variant; see `moeify.lowering.functions`) whose
body uses standard ai.onnx ops only, so any runtime that supports functions can run the model without
knowing moeify; ONNX Runtime inlines them when it loads the model.

moeify.GroupedFFN(x, token_idx, expert_idx, weight, w1, b1?, w2, b2?) -> y
    Sparse dispatch. x [T, D]; token_idx, expert_idx, weight [N] (one row per token-expert assignment;
    expert_idx == E means dropped); w1 [E, H1, D], b1 [E, H1], w2 [E, D, H], b2 [E, D].
    y[t] = sum over n with token_idx[n] = t, expert_idx[n] < E of weight[n] * expert_{expert_idx[n]}(x[t]),
    expert_e(v) = w2[e] @ act(w1[e] @ v + b1[e]) + b2[e]; gated: act(gate) * up with gate = rows [0, H) and
    up = rows [H, 2H) of the first projection. Attributes: activation (string: relu, gelu, gelu_tanh, silu,
    quick_gelu, identity), gated (int 0/1).

moeify.SoftExperts(x, dispatch, combine, w1, b1?, w2, b2?) -> y
    Soft MoE. dispatch, combine [T, E*S]. slots = dispatch^T x viewed [E, S, D]; each expert runs on its
    own S slots; y = combine @ (slot outputs viewed [E*S, D]). Same attributes.

com.microsoft.MoE (ONNX Runtime contrib op) is registered here too when onnx does not know it yet, with
the inputs and attributes of ONNX Runtime's schema, so the exporter can emit it.
"""

from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema

DOMAIN = "moeify"
VERSION = 1
MSFT_DOMAIN = "com.microsoft"

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_OPTIONAL = OpSchema.FormalParameterOption.Optional


def _optional(name: str, default, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def _param(name: str, type_str: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    if optional:
        return OpSchema.FormalParameter(name, type_str, doc, param_option=_OPTIONAL)
    return OpSchema.FormalParameter(name, type_str, doc)


def _expert_attrs() -> list[OpSchema.Attribute]:
    return [
        OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "expert activation (moeify name)"),
        OpSchema.Attribute("gated", OpSchema.AttrType.INT, "1: act(gate) * up with [gate; up] rows of w1"),
    ]


def _weights() -> list[OpSchema.FormalParameter]:
    return [
        _param("w1", "T", "[E, H1, D] first projection (H1 = 2H when gated)"),
        _param("b1", "T", "[E, H1]", optional=True),
        _param("w2", "T", "[E, D, H] down projection"),
        _param("b2", "T", "[E, D]", optional=True),
    ]


def grouped_ffn_schema() -> OpSchema:
    return OpSchema(
        "GroupedFFN", DOMAIN, VERSION,
        "Sparse MoE dispatch over a flat list of (token, expert, weight) assignments; see moeify docs.",
        inputs=[
            _param("x", "T", "[T, D] tokens"),
            _param("token_idx", "I", "[N] token of each assignment"),
            _param("expert_idx", "I", "[N] expert of each assignment (E = dropped)"),
            _param("weight", "T", "[N] combine weight of each assignment"),
            *_weights(),
        ],
        outputs=[_param("y", "T", "[T, D]")],
        type_constraints=[("T", _FLOATS, "float tensors"), ("I", ["tensor(int64)"], "indices")],
        attributes=_expert_attrs(),
    )


def soft_experts_schema() -> OpSchema:
    return OpSchema(
        "SoftExperts", DOMAIN, VERSION,
        "Soft MoE: experts run on slots mixed from all tokens, outputs mixed back; see moeify docs.",
        inputs=[
            _param("x", "T", "[T, D] tokens"),
            _param("dispatch", "T", "[T, E*S] dispatch weights (columns sum to 1)"),
            _param("combine", "T", "[T, E*S] combine weights (rows sum to 1)"),
            *_weights(),
        ],
        outputs=[_param("y", "T", "[T, D]")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=_expert_attrs(),
    )


def ort_moe_schema() -> OpSchema:
    """ONNX Runtime's com.microsoft.MoE (version 1), as far as moeify uses it."""
    A = OpSchema.AttrType
    return OpSchema(
        "MoE", MSFT_DOMAIN, 1,
        "ONNX Runtime mixture of experts (contrib op); routes internally with softmax top-k.",
        inputs=[
            _param("input", "T", "[T, D] or [B, S, D]"),
            _param("router_probs", "T", "[T, E] router logits"),
            _param("fc1_experts_weights", "T", "[E, fusion * H, D]"),
            _param("fc1_experts_bias", "T", "[E, fusion * H]", optional=True),
            _param("fc2_experts_weights", "T", "[E, D, H]"),
            _param("fc2_experts_bias", "T", "[E, D]", optional=True),
            _param("fc3_experts_weights", "T", "[E, H, D]", optional=True),
            _param("fc3_experts_bias", "T", "[E, H]", optional=True),
        ],
        outputs=[_param("output", "T", "same shape as input")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[
            _optional("activation_type", "relu", "relu, gelu (tanh), silu, swiglu, identity"),
            _optional("k", 1, "experts per token"),
            _optional("normalize_routing_weights", 0, "renormalise the top-k weights"),
            _optional("use_sparse_mixer", 0, "sparse mixer routing (k=2 only)"),
            _optional("swiglu_fusion", 0, "0 separate fc3, 1 interleaved, 2 concatenated"),
            OpSchema.Attribute("swiglu_limit", A.FLOAT, "swiglu clamp (none: no clamp)", required=False),
            _optional("activation_alpha", 1.0, "swiglu alpha"),
            _optional("activation_beta", 0.0, "swiglu beta"),
        ],
    )


@functools.cache
def register_schemas() -> None:
    """Register moeify's schemas (and com.microsoft.MoE if missing) with onnx; idempotent."""
    for make in (grouped_ffn_schema, soft_experts_schema, ort_moe_schema):
        schema = make()
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)
