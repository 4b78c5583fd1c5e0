"""Expert capacity for token-choice routing: drop what does not fit.

Shape legend: T tokens, E experts, K choices per token, N = T*K assignments.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard/Switch capacity: ceil(cf * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def active_capacity_factor(config, training: bool) -> float | None:
    """The capacity factor in force: `config.capacity_factor` in training, `config.eval_capacity_factor`
    (when set) in eval mode (ST-MoE trains at 1.25 and evaluates at 2.0)."""
    if not training and config.eval_capacity_factor is not None:
        return config.eval_capacity_factor
    return config.capacity_factor


def drop_over_capacity(expert_idx: Tensor, num_experts: int, capacity: int) -> Tensor:
    """expert_idx [T, K] -> [T, K] with assignments past each expert's capacity set to E (dropped).

    Priority: every token's first choice before any second choice (GShard), and within one choice
    rank, earlier tokens first. Deterministic, so training and a re-run agree.
    """
    T, K = expert_idx.shape
    by_rank = expert_idx.t().reshape(-1)  # [K*T]: all first choices, then all second choices
    one_hot = torch.nn.functional.one_hot(by_rank, num_experts)  # [K*T, E]
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # [K*T] slot index within its expert
    kept = torch.where(position < capacity, by_rank, torch.full_like(by_rank, num_experts))
    return kept.reshape(K, T).t()  # [T, K]
