"""Routing statistics kept by each MoE layer after a forward, for logging and plots (read them over a model
with `moeify.routing_stats`, in moeify.last_forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeify.deprecation import moved


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


__getattr__ = moved(__name__, {"routing_stats": "moeify.last_forward:routing_stats"})
