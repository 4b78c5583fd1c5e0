"""What a router hands to the experts.

Shape legend: T tokens, E experts, D model width, N token-expert assignments, S slots per expert.

Two kinds of routing exist in the literature and both are here:
- `SparseRouting`: a flat list of N (token, expert, weight) assignments. Token choice (top-k, hash,
  random, balanced) gives N = T*k; expert choice gives N = E*C. An assignment whose expert index equals E
  is *dropped* (over capacity): it costs no compute and contributes zero; the residual carries the token.
- `SoftRouting`: Soft MoE's dense dispatch/combine matrices over E*S slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class SparseRouting:
    token_idx: Tensor  # [N] int64 in [0, T): the token each assignment reads and writes
    expert_idx: Tensor  # [N] int64 in [0, E]; E = dropped
    weight: Tensor  # [N] combine weight
    logits: Tensor  # [T, E] router logits (float32), for statistics and export
    losses: dict[str, Tensor] = field(default_factory=dict)  # name -> scalar, coefficient applied

    def tokens_per_expert(self, num_experts: int) -> Tensor:
        """[E] int64: assignments each expert computes (dropped ones excluded)."""
        # scatter_add, not bincount: CUDA's bincount reads the largest index back to the host
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=self.expert_idx.device)
        return counts.scatter_add_(0, self.expert_idx, torch.ones_like(self.expert_idx))[:num_experts]

    def dense_weights(self, num_tokens: int, num_experts: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The routing as a [T, E] matrix of combine weights (0 where a token does not go; dropped
        assignments left out)."""
        dense = torch.zeros(num_tokens, num_experts + 1, dtype=dtype, device=self.weight.device)  # [T, E+1]
        dense = dense.index_put((self.token_idx, self.expert_idx), self.weight.to(dtype), accumulate=True)
        return dense[:, :num_experts]  # [T, E]

    def dropped_fraction(self, num_experts: int) -> Tensor:
        """Scalar: share of assignments dropped for capacity."""
        if self.expert_idx.numel() == 0:
            return torch.zeros((), device=self.expert_idx.device)
        return (self.expert_idx == num_experts).float().mean()


@dataclass
class SoftRouting:
    dispatch: Tensor  # [T, E*S]: each slot is a convex combination of tokens (columns sum to 1)
    combine: Tensor  # [T, E*S]: each token is a convex combination of slot outputs (rows sum to 1)
    logits: Tensor  # [T, E*S]
    losses: dict[str, Tensor] = field(default_factory=dict)

    def tokens_per_expert(self, num_experts: int) -> Tensor:
        """[E] float: dispatch mass each expert receives (each slot sums to 1, so S per expert)."""
        T = self.dispatch.shape[0]
        return self.dispatch.detach().reshape(T, num_experts, -1).sum(dim=(0, 2))

    def dropped_fraction(self, num_experts: int) -> Tensor:
        return torch.zeros((), device=self.dispatch.device)


Routing = SparseRouting | SoftRouting
