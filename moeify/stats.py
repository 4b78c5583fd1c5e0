"""Routing statistics kept by each MoE layer after a forward, for logging and plots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RoutingStats:
    """One MoE layer's routing in its last forward.

    The layer records the counts as tensors on its own device, without reading them (a `.cpu()` or
    `float()` there would make a GPU wait once per layer per step); they become host values when read:
    `tokens_per_expert` (a CPU tensor), `dropped_fraction` (a float), `load`. Each read copies."""

    device_tokens_per_expert: torch.Tensor  # [E] assignments (or soft dispatch mass) per expert, detached
    device_dropped_fraction: torch.Tensor  # [] share of assignments dropped for capacity, detached
    num_tokens: int

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] on the CPU."""
        return self.device_tokens_per_expert.cpu()

    @property
    def dropped_fraction(self) -> float:
        return float(self.device_dropped_fraction)

    @property
    def load(self) -> torch.Tensor:
        """[E] share of the routed work each expert got (sums to 1), on the CPU."""
        counts = self.tokens_per_expert
        return counts.float() / counts.sum().clamp(min=1e-9)


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Module path -> the statistics of that MoE layer's last forward (layers not yet run are absent)."""
    from moeify.layer import MoELayer

    return {name: m.last_stats for name, m in model.named_modules()
            if isinstance(m, MoELayer) and m.last_stats is not None}
