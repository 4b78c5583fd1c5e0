"""Dispatch: run the experts on routed tokens.

`grouped_ffn` is the entry point the layer calls; `impl="reference"` selects the slow reference.
"""

from __future__ import annotations

import torch

from moeify.dispatch.ops import grouped_ffn_op
from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts

Tensor = torch.Tensor


def grouped_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str, gated: bool,
                impl: str = "fast") -> Tensor:
    """x [T, D] -> [T, D]; see `reference_grouped_ffn` for the exact meaning."""
    if impl not in ("fast", "reference"):
        raise ValueError(f"unknown dispatch impl {impl!r}; valid: fast, reference")
    if impl == "reference":
        return reference_grouped_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)
    return grouped_ffn_op(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)


def soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                 b2: Tensor | None, activation: str, gated: bool, impl: str = "fast") -> Tensor:
    """Soft MoE expert computation; see `reference_soft_experts`."""
    return reference_soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation, gated)


__all__ = ["grouped_ffn", "soft_experts", "reference_grouped_ffn", "reference_soft_experts"]
