"""Export-only custom ops: what `MoELayer` calls while it is being exported (see `moeify.lowering.hook`).

Shape legend: T tokens, D d_model, H1 first-projection rows (2H when gated), E experts, S slots per expert.

- `moeify::topk_moe`: router logits -> softmax/sigmoid top-k -> experts, as ONE op, so the ONNX lowering
  sees the logits and can emit ONNX Runtime's fused `com.microsoft.MoE` (which routes internally).
- `moeify::export_soft_experts`: Soft MoE's expert computation as one op, so it lowers to the
  `moeify.SoftExperts` ONNX op instead of an unrolled per-expert loop.

Their eager bodies are the reference computation (so they are correct if ever run), and their fake kernels
give `torch.export` the output shape. They are not meant for training: no autograd.
"""

from __future__ import annotations

import torch

from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts

Tensor = torch.Tensor


def topk_weights(logits: Tensor, k: int, normalize: bool, score_fn: str) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, K], expert indices [T, K]), exactly as `TopKRouter` computes them."""
    scores = torch.softmax(logits, dim=-1) if score_fn == "softmax" else torch.sigmoid(logits)
    top_w, top_idx = torch.topk(scores, k, dim=-1)  # [T, K]
    if normalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    return top_w, top_idx


@torch.library.custom_op("moeify::topk_moe", mutates_args=())
def topk_moe(x: Tensor, logits: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
             k: int, normalize: bool, score_fn: str, activation: str, gated: bool) -> Tensor:
    """x [T, D], logits [T, E] -> [T, D]: dropless top-k token choice over the experts."""
    with torch.no_grad():
        top_w, top_idx = topk_weights(logits, k, normalize, score_fn)  # [T, K]
        T = x.shape[0]
        token_idx = torch.arange(T, device=x.device).repeat_interleave(k)  # [T*K]
        return reference_grouped_ffn(x, token_idx, top_idx.reshape(-1), top_w.reshape(-1).to(x.dtype),
                                     w1, b1, w2, b2, activation, gated)


@topk_moe.register_fake
def _(x, logits, w1, b1, w2, b2, k, normalize, score_fn, activation, gated):
    return torch.empty_like(x)


@torch.library.custom_op("moeify::export_soft_experts", mutates_args=())
def export_soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None,
                        w2: Tensor, b2: Tensor | None, activation: str, gated: bool) -> Tensor:
    """x [T, D], dispatch/combine [T, E*S] (same dtype as x) -> [T, D]."""
    with torch.no_grad():
        return reference_soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation, gated)


@export_soft_experts.register_fake
def _(x, dispatch, combine, w1, b1, w2, b2, activation, gated):
    return torch.empty_like(x)
