"""SparseMixer routing (Liu et al. 2023, "Sparse Backpropagation for MoE Training", arXiv 2310.00811), in
the form Phi-3.5-MoE trains and serves with (GRIN, Liu et al. 2024, arXiv 2409.12136, §2 "SparseMixer-v2").

Shape legend: T tokens, E experts, K = config.k (Phi-3.5-MoE: K = 2).

Routing, one round per chosen expert (round j picks the j-th expert; K rounds):
  1. mask: with m the largest score still available, every score s with (m - s) / max(|s|, m) > 2·eps is
     masked to -inf (eps = `config.sparsemixer_eps`, Phi-3.5-MoE's `router_jitter_noise` = 0.01). The
     masked set is the experts "close enough" to the best one; GRIN §2 calls this the sparsity mask.
  2. choose: training samples the expert from softmax(masked scores) (Gumbel-max); inference takes m's
     expert (the argmax).
  3. weight: softmax(masked scores) at the chosen expert. The K weights are *not* renormalised (Phi-3.5-MoE
     does not: a confident router gives [0.9, 1.0]).
  4. the chosen expert's score becomes -inf and the next round starts from the remaining scores (its mask
     factor still uses the original |s|, clamped at the new maximum, as Phi-3.5-MoE's code does).

Gradient (the mid-point estimator, SparseMixer §3.2 / GRIN §2, "Heun's third-order method"): the sampled
choice D has no gradient of its own, so the router would learn only through the weight π_D. SparseMixer
instead back-propagates through the weight *as if* the choice were differentiable:
  forward:  w = π_D · c, with c = 1 when D is the argmax of π or with probability 1/4 otherwise, else 1/3
            (the mid-point's scaling of a non-greedy sample);
  backward: ∂L/∂s_i = g · π_D · (1[i = D] - π_i), g = ∂L/∂w  (the gradient of π_D = softmax(s)_D, with the
            forward scale c left out), applied to the *scores* (router logits), masked entries getting 0.
`SparseMixerGrad` implements exactly this; Phi-3.5-MoE's `PhimoeMultiplier` is the same function (it
writes c as 0.3333 + 0.6667·1[...]; here c is exactly 1/3 or 1).

Lowering: moeify ops only (`GROUPED_FFN`). ONNX Runtime's com.microsoft.MoE has `use_sparse_mixer=1`, but
its CPU provider ignores the attribute (onnxruntime 1.31.1: the output equals plain softmax top-2, differing
from this rule by up to half the output's scale); only its CUDA kernel implements it, which cannot be
checked here, so no target maps this router to the fused op.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.routers.base import GROUPED_FFN, Router, RouterCapabilities
from moeify.routers.registry import register_router
from moeify.routers.topk import token_choice_routing
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor

NON_GREEDY_SCALE = 1.0 / 3.0  # c for a sample that is not the argmax (mid-point / Heun, GRIN §2)
KEEP_FULL_PROBABILITY = 0.25  # chance a non-greedy sample keeps c = 1 (Phi-3.5-MoE: rand > 0.75)


class SparseMixerGrad(torch.autograd.Function):
    """w = multiplier · scale forward; ∂L/∂scores = g·multiplier·(onehot(D) - probs) backward.

    scores [T, E] (the router logits, receives the gradient); multiplier [T, 1] = probs[D] (detached);
    chosen [T, 1] int64 = D; probs [T, E] = softmax of the masked scores (detached); scale [T, 1] = c.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, multiplier: Tensor, chosen: Tensor, probs: Tensor,
                scale: Tensor) -> Tensor:
        ctx.save_for_backward(multiplier, chosen, probs)
        return multiplier * scale  # [T, 1]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        multiplier, chosen, probs = ctx.saved_tensors
        g = grad_out * multiplier  # [T, 1]
        grad_scores = (-probs * g).scatter_add(-1, chosen, g)  # [T, E]
        return grad_scores, None, None, None, None


def sparsity_mask(available: Tensor, scores: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """available [T, E] (scores with the already chosen experts at -inf), scores [T, E] (original) ->
    (masked scores [T, E] with the far-from-best entries at -inf, argmax [T, 1])."""
    with torch.no_grad():
        best, best_idx = available.max(dim=-1, keepdim=True)  # [T, 1]
        factor = torch.maximum(scores.abs(), best)  # [T, E]
        far = (best - scores) / factor > 2 * eps  # [T, E]
    return available.masked_fill(far, float("-inf")), best_idx


@register_router("sparsemixer")
class SparseMixerRouter(Router):
    """Top-k (Phi-3.5-MoE: k = 2) with SparseMixer's masking, sampling and mid-point gradient; see the
    module docstring. `capacity_factor`, `aux_loss_coef` and `z_loss_coef` work as for `topk`."""

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        # com.microsoft.MoE(use_sparse_mixer=1) is not listed: its CPU kernel ignores the attribute.
        return dataclasses.replace(super().capabilities(config),
                                   mixes_tokens=config.capacity_factor is not None, lowerings=(GROUPED_FFN,))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        eps = self.config.sparsemixer_eps
        logits = self.compute_logits(x)  # [T, E]
        available = logits
        chosen_all, weights = [], []
        for _ in range(self.config.k):
            masked, greedy = sparsity_mask(available, logits, eps)  # [T, E], [T, 1]
            if self.training:
                gumbel = -torch.empty_like(masked).exponential_().log()  # [T, E]
                chosen = (masked + gumbel).argmax(dim=-1, keepdim=True)  # [T, 1]
            else:
                chosen = greedy
            probs = torch.softmax(masked, dim=-1)  # [T, E]
            weight = probs.gather(-1, chosen)  # [T, 1]
            if self.training:
                is_greedy = chosen == probs.argmax(dim=-1, keepdim=True)  # [T, 1]
                lucky = torch.rand_like(weight) > 1.0 - KEEP_FULL_PROBABILITY
                scale = torch.where(is_greedy | lucky, 1.0, NON_GREEDY_SCALE).to(weight.dtype)  # [T, 1]
                weight = SparseMixerGrad.apply(logits, weight.detach(), chosen, probs.detach(), scale)
            chosen_all.append(chosen)
            weights.append(weight)
            available = available.scatter(-1, chosen, float("-inf"))  # [T, E]
        top_idx = torch.cat(chosen_all, dim=-1)  # [T, K]
        top_w = torch.cat(weights, dim=-1)  # [T, K]
        return token_choice_routing(self, logits, torch.softmax(logits, dim=-1), top_idx, top_w)
