"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Shape legend: T tokens, E experts, S slots per expert (config.slots_per_expert), D model width.

Logits = x @ phi with phi [D, E*S] (the router weight, stored [E*S, D]). Dispatch = softmax over *tokens*
(dim 0): each slot's input is a convex combination of all tokens. Combine = softmax over *slots* (dim 1):
each token's output is a convex combination of all slot outputs. Nothing is discrete, nothing is dropped,
every expert processes exactly S slots.

Grouping: all tokens of one forward form ONE group, across the batch: x [B, N, D] is flattened to B*N
tokens before routing, so a slot mixes tokens of different sequences (and padding tokens, if any). Call the
layer per sequence for per-sequence groups. Because every slot sees every token the router is refused in a
causal decoder. `config.k` and `capacity_factor` are not used. Losses: the paper trains without auxiliary
losses (nothing needs balancing); moeify adds only the z-loss over each token's slot logits (the combine
softmax) when `z_loss_coef > 0`. The paper's optional L2 normalisation of x and phi is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.losses import router_z_loss
from moeify.routers.base import Router, RouterCapabilities
from moeify.routers.registry import register_router
from moeify.routing import SoftRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


@register_router("soft")
class SoftRouter(Router):
    mixes_tokens = True
    soft = True

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        # every expert runs on its slots for every token's share
        return dataclasses.replace(super().capabilities(config), active_experts=float(config.num_experts))

    @staticmethod
    def num_logits(config: MoEConfig) -> int:
        return config.num_experts * config.slots_per_expert

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SoftRouting:
        logits = self.compute_logits(x)  # [T, E*S]
        dispatch = torch.softmax(logits, dim=0)  # [T, E*S], columns sum to 1
        combine = torch.softmax(logits, dim=1)  # [T, E*S], rows sum to 1
        losses = {}
        if self.config.z_loss_coef > 0:
            losses["z_loss"] = self.config.z_loss_coef * router_z_loss(logits)
        return SoftRouting(dispatch=dispatch, combine=combine, logits=logits, losses=losses)
