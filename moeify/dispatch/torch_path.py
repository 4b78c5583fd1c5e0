"""Grouped experts in plain torch ops: the path for an activation given as a module or function.

Shape legend: T tokens, D model width, H1 first-projection width (2H when gated), H hidden, E experts,
N assignments, M kept (not dropped) assignments.

Sort the assignments by expert, run each expert's two matmuls on its own contiguous rows, apply the
activation once to all kept rows, scatter the weighted rows back to their tokens. Every step is an ordinary
torch op, so autograd covers it (a module with learned parameters trains) and `torch.export` traces it to
standard ONNX ops (the lowering of a custom activation, `moeify.lowering.ops.traced`). The fast kernel
(`moeify.dispatch.ops`) stays for named activations.
"""

from __future__ import annotations

import torch

from moeify.activations import Activation, apply_expert_activation

Tensor = torch.Tensor


def _per_expert(rows: list[Tensor], w: Tensor, b: Tensor | None) -> Tensor:
    """rows[e] [n_e, I] -> cat over e of rows[e] @ w[e]^T (+ b[e]): [M, O]; w [E, O, I], b [E, O]."""
    # matmul then add, as the reference does (addmm rounds differently)
    outs = [r @ w[e].t() if b is None else r @ w[e].t() + b[e] for e, r in enumerate(rows)]
    return torch.cat(outs)


def torch_grouped_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                      b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: Activation,
                      gated: bool) -> Tensor:
    """Same result as `reference_grouped_ffn` (x [T, D] -> [T, D]), grouped by expert."""
    E = w1.shape[0]
    # [N] dropped assignments (expert E) last; not a stable sort: ONNX has none, and order within an
    # expert does not matter
    order = torch.argsort(expert_idx)
    # rows per expert (and dropped, last) without bincount, whose output length depends on the data
    counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add(
        0, expert_idx, torch.ones_like(expert_idx))  # [E+1]
    sizes = counts.tolist()
    for size in sizes:
        torch._check(size >= 0)  # lets torch.export reason about the data-dependent split sizes
    kept = sum(sizes[:E])  # M
    token = token_idx[order][:kept]  # [M]
    rows = x[token]  # [M, D]
    h = _per_expert(list(torch.split(rows, sizes[:E])), w1, b1)  # [M, H1]
    a = apply_expert_activation(h, activation, gated)  # [M, H]
    y = _per_expert(list(torch.split(a, sizes[:E])), w2, b2)  # [M, D]
    y = y * weight[order][:kept].unsqueeze(1).to(y.dtype)  # [M, D]
    return torch.zeros_like(x).index_add(0, token, y)  # [T, D]
