"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape legend: T tokens, E experts, C tokens per expert.

Scores S = softmax(logits) over experts [T, E]; each expert takes the C tokens with its highest scores,
C = ceil(capacity_factor * T * k / E) (capacity_factor defaults to 1.0 when None; C is capped at T), and
weighs each by its score. Every expert does exactly C tokens of work (perfect balance by construction, so no
load-balancing loss); a token may be picked by 0..E experts, and a token no expert picks gets a zero routed
output (the residual carries it). Which tokens an expert takes depends on every token of the forward, so
the router mixes tokens and is refused in a causal decoder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from moeify.losses import router_z_loss
from moeify.routers.base import Router, RouterCapabilities
from moeify.routers.capacity import active_capacity_factor
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def expert_choice_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """C = ceil(cf * T * k / E), cf = 1.0 when None, clamped to [min(1, T), T]."""
    cf = 1.0 if capacity_factor is None else capacity_factor
    return min(num_tokens, max(1, math.ceil(cf * num_tokens * k / num_experts)))


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    mixes_tokens = True

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        # E experts x C = ceil(cf*T*k/E) tokens each: cf*k experts per token on average (C is capped at T)
        active = min(config.num_experts, config.k * (config.capacity_factor or 1.0))
        return dataclasses.replace(super().capabilities(config), active_experts=float(active))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        cfg = self.config
        T, E = x.shape[0], self.num_experts
        C = expert_choice_capacity(T, cfg.k, E, active_capacity_factor(cfg, self.training))
        logits = self.compute_logits(x)  # [T, E]
        scores = torch.softmax(logits, dim=-1)  # [T, E] token-to-expert affinity
        weight, token_idx = torch.topk(scores.t(), C, dim=-1)  # [E, C] each expert's C best tokens
        # [E*C]; expand, not repeat_interleave(C): the ONNX exporter mis-lowers repeat_interleave by a
        # data-dependent count (C follows the token count)
        expert_idx = torch.arange(E, device=x.device).unsqueeze(1).expand(E, C).reshape(-1)
        losses = {}
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * router_z_loss(logits)
        return SparseRouting(token_idx=token_idx.reshape(-1), expert_idx=expert_idx,
                             weight=weight.reshape(-1), logits=logits, losses=losses)
