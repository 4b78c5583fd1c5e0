"""The slow, obviously correct MoE computation every fast path is tested against.

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts,
N assignments. Plain autograd ops, one Python iteration per expert, nothing clever. `activation` is a
name of `moeify.activations.ACTIVATIONS` or any elementwise callable (a module such as nn.PReLU).
"""

from __future__ import annotations

import torch

from moeify.activations import Activation, apply_expert_activation

Tensor = torch.Tensor


def expert_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
               activation: Activation, gated: bool, dropout: float = 0.0) -> Tensor:
    """One expert: x [n, D], w1 [H1, D], w2 [D, H] -> [n, D]. `dropout` > 0 drops hidden activations
    (inverted dropout, as `nn.Dropout` in training): Switch/ST-MoE's expert dropout."""
    h = x @ w1.t()  # [n, H1]
    if b1 is not None:
        h = h + b1
    a = apply_expert_activation(h, activation, gated)  # [n, H]
    if dropout > 0:
        a = torch.nn.functional.dropout(a, dropout, training=True)
    y = a @ w2.t()  # [n, D]
    if b2 is not None:
        y = y + b2
    return y


def reference_grouped_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                          w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                          activation: Activation, gated: bool, dropout: float = 0.0) -> Tensor:
    """out[t] = sum over assignments n with token_idx[n] = t of weight[n] * expert_{expert_idx[n]}(x[t]).

    x [T, D]; token_idx, expert_idx, weight [N]; w1 [E, H1, D]; b1 [E, H1]; w2 [E, D, H]; b2 [E, D].
    Assignments with expert_idx == E are dropped.
    """
    E = w1.shape[0]
    out = torch.zeros_like(x)  # [T, D]
    for e in range(E):
        rows = (expert_idx == e).nonzero().squeeze(1)  # [n_e]
        if rows.numel() == 0:
            continue
        tokens = token_idx[rows]  # [n_e]
        y = expert_ffn(x[tokens], w1[e], None if b1 is None else b1[e], w2[e],
                       None if b2 is None else b2[e], activation, gated, dropout)  # [n_e, D]
        out = out.index_add(0, tokens, y * weight[rows].unsqueeze(1).to(y.dtype))
    return out


def reference_soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None,
                           w2: Tensor, b2: Tensor | None, activation: Activation, gated: bool,
                           dropout: float = 0.0) -> Tensor:
    """Soft MoE: slots = dispatch^T x, each expert runs on its S slots, out = combine @ slot outputs.

    x [T, D]; dispatch, combine [T, E*S].
    """
    E = w1.shape[0]
    S = dispatch.shape[1] // E
    slots = dispatch.t().to(x.dtype) @ x  # [E*S, D]
    outs = []
    for e in range(E):
        outs.append(expert_ffn(slots[e * S:(e + 1) * S], w1[e], None if b1 is None else b1[e], w2[e],
                               None if b2 is None else b2[e], activation, gated, dropout))  # [S, D]
    return combine.to(x.dtype) @ torch.cat(outs, dim=0)  # [T, D]
