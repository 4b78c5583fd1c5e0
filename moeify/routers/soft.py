"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Shape legend: T tokens, E experts, S slots per expert (config.slots_per_expert), D model width.

Logits = x @ phi with phi [D, E*S] (the router weight, stored [E*S, D]). Dispatch = softmax over *tokens*
(dim 0): each slot's input is a convex combination of all tokens. Combine = softmax over *slots* (dim 1):
each token's output is a convex combination of all slot outputs. Nothing is discrete, nothing is dropped,
every expert processes exactly S slots.

Grouping (`config.soft_groups`):
- "batch" (default): all tokens of one forward form ONE group, across the batch: x [B, N, D] is flattened to
  B*N tokens before routing, so a slot mixes tokens of different sequences (and padding tokens, if any).
- "sequence": each sequence has its own E*S slots, as the paper does (§2.1: the Soft MoE layer maps one
  input sequence X [m, d]; per-sample in the deep-RL paper, Obando-Ceron et al. 2024). The router only sees
  the flattened tokens [T, D], so the layer passes `groups` = the number of sequences (every leading dim of
  x but the last; `MoELayer.routing_groups`), and the tokens of one sequence are contiguous. The G groups'
  slots are laid out expert-major as E experts x (G*S) slots, with block-diagonal dispatch/combine
  [T, E*G*S] (a token only reaches its own sequence's slots), so the expert computation and its ONNX op
  are unchanged; the matrices cost T*E*G*S, quadratic in the batch: meant for moderate batches.
Because every slot sees every token of its group the router is refused in a causal decoder. `config.k` and
`capacity_factor` are not used. Losses: the paper trains without auxiliary losses (nothing needs
balancing); moeify adds only the z-loss over each token's slot logits (the combine softmax) when
`z_loss_coef > 0`.

Normalisation (`config.soft_normalize`, the paper's §2.3 recommendation at scale): logits =
scale * l2norm(x) @ l2norm(phi), each token and each slot parameter normalised over D, `scale` a learned
scalar initialised to 1, so the logits stay bounded as D grows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

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

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.scale = nn.Parameter(torch.ones(())) if config.soft_normalize else None

    @staticmethod
    def num_logits(config: MoEConfig) -> int:
        return config.num_experts * config.slots_per_expert

    def compute_logits(self, x: Tensor) -> Tensor:
        if self.scale is None:
            return super().compute_logits(x)
        dtype = getattr(torch, self.config.router_dtype)
        x_unit = nn.functional.normalize(x.to(dtype), dim=-1)  # [T, D]
        phi_unit = nn.functional.normalize(self.weight.to(dtype), dim=-1)  # [E*S, D]
        return self.scale.to(dtype) * (x_unit @ phi_unit.t())  # [T, E*S]

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int = 1) -> SoftRouting:
        logits = self.compute_logits(x)  # [T, E*S]
        if groups == 1:
            dispatch = torch.softmax(logits, dim=0)  # [T, E*S], columns sum to 1
            combine = torch.softmax(logits, dim=1)  # [T, E*S], rows sum to 1
        else:
            dispatch, combine = self._grouped(logits, groups)  # [T, E*G*S] each
        losses = {}
        if self.config.z_loss_coef > 0:
            losses["z_loss"] = self.config.z_loss_coef * router_z_loss(logits)
        return SoftRouting(dispatch=dispatch, combine=combine, logits=logits, losses=losses)

    def _grouped(self, logits: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """logits [T, E*S], T = G*N tokens in G contiguous sequences -> block-diagonal dispatch and combine
        [T, E*G*S], slot (e, g, s) at column e*G*S + g*S + s."""
        G, E = groups, self.num_experts
        T, ES = logits.shape
        per_group = logits.reshape(G, T // G, ES)  # [G, N, E*S]
        dispatch = torch.softmax(per_group, dim=1)  # [G, N, E*S]: over the sequence's own tokens
        combine = torch.softmax(per_group, dim=2)  # [G, N, E*S]: over the sequence's own slots
        eye = torch.eye(G, dtype=logits.dtype, device=logits.device)  # [G, G]

        def block_diagonal(m: Tensor) -> Tensor:
            m = m.reshape(G, T // G, E, 1, ES // E) * eye.reshape(G, 1, 1, G, 1)  # [G, N, E, G, S]
            return m.reshape(T, E * G * (ES // E))  # [T, E*G*S]

        return block_diagonal(dispatch), block_diagonal(combine)
