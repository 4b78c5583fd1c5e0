"""A plain dense FFN with the same activation/gating conventions as the experts.

Used for DeepSeekMoE-style shared experts (S shared experts of width Hs are one FFN of width S*Hs: the
sum of FFNs on the same input is one FFN over the concatenated hidden units) and as the dense baseline
in benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeify.activations import Activation
from moeify.dispatch.reference import expert_ffn

Tensor = torch.Tensor


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: Activation = "gelu", gated: bool = False,
                 bias: bool = True):
        """`activation`: a name, or an elementwise module/function (a module becomes a submodule)."""
        super().__init__()
        self.activation, self.gated = activation, gated
        h1 = 2 * d_ff if gated else d_ff
        self.w1 = nn.Parameter(torch.empty(h1, d_model))  # [H1, D]
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff))  # [D, H]
        self.b1 = nn.Parameter(torch.zeros(h1)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(d_model)) if bias else None
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(d_ff))

    def forward(self, x: Tensor) -> Tensor:
        return expert_ffn(x, self.w1, self.b1, self.w2, self.b2, self.activation, self.gated)
