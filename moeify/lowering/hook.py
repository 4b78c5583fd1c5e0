"""`MoELayer.forward` while exporting for an ONNX target: route to ops the ONNX lowering knows.

Shape legend: T tokens, D d_model, E experts.

The layer calls `lowered_forward` only when `torch.compiler.is_exporting()` and `export_onnx` has set a
target. The computation is the layer's own (same router, same experts, same shared-expert sum); only the
ops change so that each maps to one ONNX node:
  - target "ort", a layer `fused_plan` accepts: logits -> `moeify::topk_moe` -> com.microsoft.MoE;
  - sparse routings otherwise: the router's ops (standard ONNX) -> `moeify::grouped_ffn` -> moeify.GroupedFFN;
  - soft routings: `moeify::export_soft_experts` -> moeify.SoftExperts.
Expert parallelism (`layer.expert_parallel`) is a training-time concern and is not exported.
"""

from __future__ import annotations

import torch

import moeify.lowering.ops  # noqa: F401  (registers torch.ops.moeify.topk_moe / export_soft_experts)
from moeify.lowering.context import planned_lowering, record_lowering
from moeify.lowering.fused import FusedPlan, fused_plan
from moeify.routing import SoftRouting

Tensor = torch.Tensor


def plan_for(layer, target: str) -> FusedPlan:
    """The lowering of `layer`'s experts for `target` (call outside tracing: it may probe onnxruntime)."""
    if target == "ort":
        return fused_plan(layer)
    return FusedPlan(False, "moeify.GroupedFFN", "portable target: standard ops only")


def lowered_forward(layer, x: Tensor, token_ids: Tensor | None, target: str,
                    router_kwargs: dict | None = None) -> Tensor:
    """x [T, D] -> [T, D], the layer's computation expressed in export-friendly ops. `router_kwargs`:
    extra router arguments (`MoELayer.routing_groups`)."""
    cfg = layer.config
    plan = planned_lowering(layer) or plan_for(layer, target)
    if plan.fused:
        logits = layer.router.compute_logits(x)  # [T, E] router dtype
        out = torch.ops.moeify.topk_moe(x, logits, layer.w1, layer.b1, layer.w2, layer.b2, cfg.k,
                                        cfg.normalize, cfg.score_fn, cfg.activation, cfg.gated)  # [T, D]
    else:
        routing = layer.router(x, token_ids=token_ids, **(router_kwargs or {}))
        if isinstance(routing, SoftRouting):
            plan = FusedPlan(False, "moeify.SoftExperts", plan.reason)
            out = torch.ops.moeify.export_soft_experts(
                x, routing.dispatch.to(x.dtype), routing.combine.to(x.dtype), layer.w1, layer.b1, layer.w2,
                layer.b2, cfg.activation, cfg.gated)  # [T, D]
        else:
            out = torch.ops.moeify.grouped_ffn(
                x, routing.token_idx, routing.expert_idx, routing.weight.to(x.dtype), layer.w1, layer.b1,
                layer.w2, layer.b2, cfg.activation, cfg.gated)  # [T, D]
    if layer.shared is not None:
        out = out + layer.shared(x)
    record_lowering(layer, plan)
    return out
