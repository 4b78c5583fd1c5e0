"""Router auxiliary losses. Each takes float32 router tensors and returns a scalar.

Shape legend: T tokens, E experts, N assignments.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def load_balance_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    probs [T, E]: router probabilities; expert_idx [N]: chosen experts (E = dropped, still counted as
    chosen, as in Switch where f counts routing decisions, not what fit). Equals 1.0 under perfectly
    uniform routing and grows as routing concentrates.
    """
    chosen = expert_idx.clamp(max=num_experts - 1)  # [N]
    counts = torch.bincount(chosen, minlength=num_experts).to(probs.dtype)  # [E]
    fraction = counts / counts.sum().clamp(min=1)  # [E] f_e
    mean_prob = probs.mean(dim=0)  # [E] P_e
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small and stable."""
    if logits.numel() == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()
