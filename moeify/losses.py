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


def consistency_loss(logits_a: Tensor, logits_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """THOR's consistency regulariser (Zuo et al. 2022, "Taming Sparsely Activated Transformer with
    Stochastic Experts", ICLR 2022, arXiv 2110.04260, §3): the symmetric KL
        CR(p1, p2) = 1/2 (KL(p1 || p2) + KL(p2 || p1)) = 1/2 sum_c (p1_c - p2_c)(log p1_c - log p2_c),
    p = softmax of each forward's logits over the last dim. The factor 1/2 and the form are the authors'
    released code's (microsoft/Stochastic-Mixture-of-Experts, thor/translation_thor.py, `symmetric_KL_loss`:
    "symmetric KL-divergence 1/2*(KL(p||q)+KL(q||p))").

    logits_a, logits_b [..., C]: the outputs of two forwards of the same input under different random routes
    (or dropout masks). Averaged over the leading positions (tokens, samples), or over those where `mask`
    [...] (bool) is True: the released code sums over the non-padding target tokens only, then divides by
    their count as it does the cross-entropy, so pass the same mask as the task loss ignores. Both sides get
    gradient, as in the paper (each pass is the other's teacher). Symmetric in a and b.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"consistency_loss needs logits of one shape, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(logits_a.shape[:-1]):
        raise ValueError(f"consistency_loss's mask must have the logits' leading shape "
                         f"{tuple(logits_a.shape[:-1])}, got {tuple(mask.shape)}")
    log_a = torch.log_softmax(logits_a.float(), dim=-1)  # [..., C]
    log_b = torch.log_softmax(logits_b.float(), dim=-1)  # [..., C]
    kl_ab = (log_a.exp() * (log_a - log_b)).sum(dim=-1)  # [...] KL(p_a || p_b)
    kl_ba = (log_b.exp() * (log_b - log_a)).sum(dim=-1)  # [...] KL(p_b || p_a)
    cr = 0.5 * (kl_ab + kl_ba)  # [...]
    if mask is None:
        return cr.mean()
    keep = mask.to(cr.dtype)  # [...]
    return (cr * keep).sum() / keep.sum().clamp(min=1)
