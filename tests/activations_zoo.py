"""Activation modules the custom-activation tests use: none of them is a named moeify activation."""

from __future__ import annotations

import torch
from torch import nn


class SquaredReLU(nn.Module):
    """relu(x)**2 (Primer; Nemotron's and Arcee's FFNs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


def learned_prelu(channels: int = 1) -> nn.PReLU:
    """nn.PReLU with a slope that is not the default, so a wrong slope shows."""
    module = nn.PReLU(channels)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.1, 0.4, channels))
    return module
