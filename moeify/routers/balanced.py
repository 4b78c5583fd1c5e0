"""Balanced assignment routing (BASE layers, Lewis et al. 2021; Sinkhorn relaxation as in S-BASE, Clark et
al. 2022).

Shape legend: T tokens, E experts.

Training: each token gets exactly one expert, and every expert gets floor(T/E) or ceil(T/E) tokens (as equal
as the count allows). The assignment comes from the Sinkhorn-normalised affinities (`config.sinkhorn_iters`
rounds of making each expert's column sum to T/E and each token's row sum to 1, in log space), followed by a
greedy fill under those per-expert quotas (see `balanced_assignment`). BASE solves the linear assignment
problem exactly (auction algorithm); Sinkhorn + greedy is the cheap, vectorised approximation.
Inference: plain top-1 of the logits (BASE does the same: no token may see the others at test time).

Combine weight: sigmoid(logit of the assigned expert), BASE's choice; it is what carries the task gradient
to the router (the assignment itself is discrete). Consequence: copies of one dense FFN do NOT reproduce it
under this router; they give sigmoid(a) * FFN(x), about 0.5 * FFN(x) at the small initial logits. Use
`topk` (normalised) when an upcycled model must start equal to the dense one.

The training assignment depends on every token of the forward, so the router mixes tokens and is refused in
a causal decoder. `config.k` and `capacity_factor` are not used (always top-1, never dropped). Losses: the
z-loss on the logits when `z_loss_coef > 0`; no load-balancing loss (balance holds by construction).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from moeify.losses import router_z_loss
from moeify.routers.base import Router, RouterCapabilities
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """logits [T, E] -> log of a matrix with columns summing to T/E and rows summing to 1 (approximately
    for the columns after the last row step)."""
    T, E = logits.shape
    log_p = logits.float()
    log_col = math.log(T / E)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col  # experts get T/E each
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)  # tokens give 1 each
    return log_p


def expert_quotas(probs: Tensor) -> Tensor:
    """probs [T, E] -> [E] int64 quotas: floor(T/E) each, +1 for the T mod E experts with most mass."""
    T, E = probs.shape
    quota = torch.full((E,), T // E, dtype=torch.int64, device=probs.device)
    extra = T % E
    if extra:
        favourite = torch.argsort(probs.sum(dim=0), descending=True, stable=True)[:extra]
        quota[favourite] += 1
    return quota


def balanced_assignment(scores: Tensor, quota: Tensor) -> Tensor:
    """scores [T, E], quota [E] summing to T -> expert [T] int64 with exactly quota[e] tokens on expert e.

    Rounds of proposals: every unassigned token proposes to its best expert that still has room; each expert
    accepts its best proposers up to its room. Each round either places every proposer or fills an expert,
    so at most E rounds; since the quotas sum to T, every token is placed.
    """
    T, E = scores.shape
    expert = torch.full((T,), -1, dtype=torch.int64, device=scores.device)  # [T]
    room = quota.clone()  # [E]
    for _ in range(E + 1):
        todo = (expert < 0).nonzero().squeeze(1)  # [U]
        if todo.numel() == 0:
            break
        s = scores[todo].masked_fill(room.unsqueeze(0) <= 0, float("-inf"))  # [U, E]
        best_score, best = s.max(dim=1)  # [U]
        # rank of each proposer among those proposing to the same expert (higher score first, then lower
        # token index): sort by score, then stably by expert
        order = torch.argsort(best_score, descending=True, stable=True)  # [U]
        order = order[torch.argsort(best[order], stable=True)]  # [U] grouped by expert, best first
        grouped = best[order]  # [U]
        starts = torch.searchsorted(grouped, grouped, right=False)  # [U] first position of each group
        rank = torch.arange(order.numel(), device=scores.device) - starts  # [U]
        accepted = rank < room[grouped]  # [U]
        expert[todo[order[accepted]]] = grouped[accepted]
        room -= torch.bincount(grouped[accepted], minlength=E)
    left = (expert < 0).nonzero().squeeze(1)  # [L] non-empty only with NaN scores: fill leftover room
    if left.numel():
        spare = torch.repeat_interleave(torch.arange(E, device=scores.device), room.clamp(min=0))  # [>= L]
        expert[left] = spare[: left.numel()]
    return expert


@register_router("balanced")
class BalancedRouter(Router):
    mixes_tokens = True  # in training; refused in causal decoders altogether

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        return dataclasses.replace(super().capabilities(config), active_experts=1.0)  # top-1 whatever k says

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        cfg = self.config
        T = x.shape[0]
        logits = self.compute_logits(x)  # [T, E]
        if self.training and T > 0:
            with torch.no_grad():
                log_p = sinkhorn(logits.detach(), cfg.sinkhorn_iters)  # [T, E]
                quota = expert_quotas(torch.softmax(logits.detach(), dim=-1))  # [E]
                expert = balanced_assignment(log_p, quota)  # [T]
        else:
            expert = logits.argmax(dim=-1)  # [T]
        token_idx = torch.arange(T, device=x.device)  # [T]
        weight = torch.sigmoid(logits.gather(1, expert.unsqueeze(1)).squeeze(1))  # [T]
        losses = {}
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * router_z_loss(logits)
        return SparseRouting(token_idx=token_idx, expert_idx=expert, weight=weight, logits=logits,
                             losses=losses)
