"""The router interface every routing scheme implements.

A router is an `nn.Module` mapping hidden states x [T, D] (and optionally the token ids [T]) to a
`SparseRouting` or `SoftRouting`. It computes its own auxiliary losses and returns them in the routing
object: no global state. One router instance may be shared by several layers (Omni-router).
"""

from __future__ import annotations

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.routing import Routing

Tensor = torch.Tensor


class Router(nn.Module):
    name: str = "?"
    # True when one token's routing depends on other tokens of the batch (expert choice, soft,
    # balanced): such routers break causality in a decoder and are refused there.
    mixes_tokens: bool = False
    # True when the router has no learned projection (hash).
    learned: bool = True

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        if self.learned:
            # weight [E, D]; small random init (std 0.02, as GPT-2/LLaMA init their linears)
            self.weight = nn.Parameter(torch.empty(self.num_logits(config), config.d_model))
            nn.init.normal_(self.weight, std=0.02)

    @staticmethod
    def num_logits(config: MoEConfig) -> int:
        return config.num_experts

    def compute_logits(self, x: Tensor) -> Tensor:
        """x [T, D] -> logits [T, E] in the router dtype (float32 by default, whatever x is)."""
        dtype = getattr(torch, self.config.router_dtype)
        x = x.to(dtype)
        if self.training and self.config.jitter_noise > 0:
            eps = self.config.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x @ self.weight.to(dtype).t()  # [T, E]

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError
