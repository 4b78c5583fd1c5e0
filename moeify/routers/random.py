"""Random routing (THOR, Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts").

Shape legend: T tokens, E experts, K = config.k.

Training: each token draws K distinct experts uniformly at random (from torch's normal RNG, like dropout;
seed it with `torch.manual_seed` for a reproducible run), each with weight 1/K.
Inference: a deterministic rule, `config.random_eval_rule`:
- "hash": the hash router's rule (same seed, same experts; token ids when given, else the hidden state), so a
  token always meets the same K experts;
- "mean": every expert with weight 1/E (the ensemble THOR's random choice averages over; E times the
  compute of one expert).
Nothing is learned: no auxiliary losses, no capacity. A token's route never depends on other tokens, so the
router is causal-safe.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.routers.base import GROUPED_FFN, ORT_MOE, Router, RouterCapabilities
from moeify.routers.hash import fixed_routing
from moeify.routers.hashing import TokenHash
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


@register_router("random")
class RandomRouter(Router):
    learned = False

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        # at inference: the hash rule reads the token ids and runs k experts (com.microsoft.MoE fed their log
        # one-hot weights, as for the hash router); "mean" runs all E of weight 1/E (the op with k=E and equal
        # router_probs)
        hashing = config.random_eval_rule == "hash"
        return dataclasses.replace(super().capabilities(config), reads_token_ids=hashing,
                                   active_experts=float(config.k if hashing else config.num_experts),
                                   lowerings=(ORT_MOE, GROUPED_FFN))

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        # Built whatever the rule, so a checkpoint loads whichever rule the config asks for at inference.
        self.hash = TokenHash(config)

    @classmethod
    def preserves_dense(cls, upcycle, config: MoEConfig) -> bool:
        """Copies are exact under every rule: K experts of weight 1/K (training, "hash") or all E of weight
        1/E ("mean") sum to 1."""
        return upcycle.copies_dense

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        T, E, K = x.shape[0], self.num_experts, self.config.k
        if self.training:
            draws = torch.rand(T, E, device=x.device)  # [T, E]; top-K of iid uniforms = K distinct experts
            return fixed_routing(torch.topk(draws, K, dim=-1).indices, draws)
        if self.config.random_eval_rule == "hash":
            experts, scores = self.hash(x, token_ids, K)  # [T, K], [T, E]
            return fixed_routing(experts, scores)
        # "mean": every expert, weight 1/E
        experts = torch.arange(E, device=x.device).expand(T, E)  # [T, E]
        return fixed_routing(experts, torch.zeros(T, E, device=x.device))
