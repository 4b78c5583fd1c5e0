"""Routing statistics kept by each MoE layer after a forward, for logging and plots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RoutingStats:
    tokens_per_expert: torch.Tensor  # [E] assignments (or soft dispatch mass) per expert, detached, CPU
    dropped_fraction: float  # share of assignments dropped for capacity
    num_tokens: int

    @property
    def load(self) -> torch.Tensor:
        """[E] share of the routed work each expert got (sums to 1)."""
        total = self.tokens_per_expert.sum().clamp(min=1e-9)
        return self.tokens_per_expert.float() / total


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Module path -> the statistics of that MoE layer's last forward (layers not yet run are absent)."""
    from moeify.layer import MoELayer

    return {name: m.last_stats for name, m in model.named_modules()
            if isinstance(m, MoELayer) and m.last_stats is not None}
