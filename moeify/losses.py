"""Router auxiliary losses. Each takes float32 router tensors and returns a scalar.

Shape legend: T tokens, E experts, N assignments.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def load_balance_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    probs [T, E]: router probabilities; expert_idx [N]: the experts the tokens *chose* (routing decisions,
    taken before any capacity drop, as in Switch where f counts what the router decided, not what fit).
    f_e = share of the N assignments that chose e (for top-k, N = T*k, so a uniform top-k routing still
    gives f_e = 1/E), P_e = mean router probability of e. Equals 1.0 under perfectly uniform routing and E
    when every token sends everything to one expert. Indices >= E (dropped markers) are ignored: pass the
    choices before dropping.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    # Counted with scatter_add on index E for the dropped markers (no boolean mask, no bincount: both read
    # a size back to the host, which stalls a GPU).
    counts = torch.zeros(num_experts + 1, dtype=probs.dtype, device=probs.device)  # [E+1]
    ones = torch.ones_like(expert_idx, dtype=probs.dtype)  # [N]
    counts = counts.scatter_add_(0, expert_idx.clamp(max=num_experts), ones)[:num_experts]  # [E]
    fraction = counts / counts.sum().clamp(min=1)  # [E] f_e (no gradient: counts are discrete)
    mean_prob = probs.mean(dim=0)  # [E] P_e (the gradient flows here)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    logits [T, L]; the logsumexp runs over the last dim (experts, or slots for Soft MoE). Penalises large
    logits so the router's softmax stays in a numerically safe range.
    """
    if logits.numel() == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()
