"""The `custom_translation_table` handed to `torch.onnx.export`: moeify's torch ops -> ONNX nodes.

Shape legend: T tokens, D d_model, H hidden, H1 = 2H when gated, E experts.

- moeify::grouped_ffn         -> moeify.GroupedFFN (function body attached after export)
- moeify::export_soft_experts -> moeify.SoftExperts
- moeify::topk_moe            -> com.microsoft.MoE (ONNX Runtime's fused kernel; only emitted for layers
                                 `fused_plan` accepted, see moeify.lowering.fused)
The portable target uses the same translation and inlines the function bodies afterwards.
"""

from __future__ import annotations

import onnxscript
from onnxscript import opset18 as op

from moeify.lowering.fused import ORT_ACTIVATIONS
from moeify.lowering.schemas import DOMAIN, MSFT_DOMAIN, VERSION, register_schemas

register_schemas()
moe_ops = onnxscript.values.Opset(DOMAIN, VERSION)
msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)


def grouped_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation: str, gated: bool):
    return moe_ops.GroupedFFN(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation=activation,
                              gated=int(gated))


def soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation: str, gated: bool):
    return moe_ops.SoftExperts(x, dispatch, combine, w1, b1, w2, b2, activation=activation, gated=int(gated))


def topk_moe(x, logits, w1, b1, w2, b2, k: int, normalize: bool, score_fn: str, activation: str, gated: bool):
    if score_fn == "sigmoid":
        # log(sigmoid(l)) = -softplus(-l): the op's softmax + renormalisation then gives sigmoid weights
        # renormalised over the top k (see moeify.lowering.fused).
        logits = op.Neg(op.Softplus(op.Neg(logits)))
    probs = op.CastLike(logits, x)  # [T, E] the op wants the activation dtype
    attrs = {"k": k, "activation_type": ORT_ACTIVATIONS[(activation, gated)],
             "normalize_routing_weights": int(normalize)}
    if gated:
        # moeify stacks [gate; up] rows; ORT's CPU kernel wants them interleaved (row 2i gate, 2i+1 up).
        # On initializers ONNX Runtime folds this at session start.
        E, H1, D = (int(d) for d in w1.shape)
        H = H1 // 2
        w1 = op.Reshape(op.Transpose(op.Reshape(w1, [E, 2, H, D]), perm=[0, 2, 1, 3]), [E, H1, D])
        if b1 is not None:
            b1 = op.Reshape(op.Transpose(op.Reshape(b1, [E, 2, H]), perm=[0, 2, 1]), [E, H1])
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    return msft.MoE(x, probs, w1, b1, w2, b2, **attrs)


def translation_table() -> dict:
    import torch

    import moeify.dispatch  # noqa: F401  (registers moeify::grouped_ffn)
    import moeify.lowering.ops  # noqa: F401  (registers the export-only ops)

    return {
        torch.ops.moeify.grouped_ffn.default: grouped_ffn,
        torch.ops.moeify.export_soft_experts.default: soft_experts,
        torch.ops.moeify.topk_moe.default: topk_moe,
    }
