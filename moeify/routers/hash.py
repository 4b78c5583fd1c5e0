"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): no learned router.

Shape legend: T tokens, E experts, K = config.k.

Each token goes to K distinct experts fixed by a hash (see `moeify.routers.hashing`): of its token id when
the model passes `token_ids` to the layer (`MoELayer.forward(x, token_ids=ids)`), else of a fixed random
projection of its hidden state. Each expert's weight is 1/K, so K copies of a dense FFN reproduce it.
Nothing is learned and nothing needs balancing: no auxiliary losses. A token's route depends on that token
alone, so the router is causal-safe. `capacity_factor` is not used: nothing is dropped.
The ONNX export for ONNX Runtime feeds the fused com.microsoft.MoE the log one-hot weights
(`moeify.lowering.ops.ort_moe`): exact.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.routers.base import GROUPED_FFN, ORT_MOE, Router, RouterCapabilities
from moeify.routers.hashing import TokenHash
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def fixed_routing(experts: Tensor, scores: Tensor) -> SparseRouting:
    """Routing with weight 1/K for each of the K experts a token got; experts [T, K], scores [T, E]."""
    T, K = experts.shape
    token_idx = torch.arange(T, device=experts.device).repeat_interleave(K)  # [T*K]
    weight = torch.full((T * K,), 1.0 / K, device=experts.device)  # [T*K]
    return SparseRouting(token_idx=token_idx, expert_idx=experts.reshape(-1), weight=weight, logits=scores)


@register_router("hash")
class HashRouter(Router):
    learned = False
    reads_token_ids = True

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        # k distinct experts of weight 1/k per token: com.microsoft.MoE fed their log one-hot weights
        return dataclasses.replace(super().capabilities(config), lowerings=(ORT_MOE, GROUPED_FFN))

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.hash = TokenHash(config)

    @classmethod
    def preserves_dense(cls, upcycle, config: MoEConfig) -> bool:
        """Copies are exact: whichever K experts a token gets, their weights 1/K sum to 1."""
        return upcycle.copies_dense

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        experts, scores = self.hash(x, token_ids, self.config.k)  # [T, K], [T, E]
        return fixed_routing(experts, scores)
