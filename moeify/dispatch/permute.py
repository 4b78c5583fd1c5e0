"""Token permutation by expert and its inverse, for the grouped-GEMM dispatch (`moeify.dispatch.grouped`).

Shape legend: T tokens, D row width, E experts, N assignments, M kept assignments (expert index < E).

The grouped GEMM wants each expert's rows contiguous, so the assignments are sorted by expert once
(`plan_by_expert`); `gather_rows` builds the sorted rows from the token rows (the permutation), and
`combine_rows` sums the sorted rows back into their tokens (its inverse, with the combine weights). The
backward of one is the other: the gradient of a gather is a combine and vice versa.

Everything keeps static shapes (N sorted rows, dropped assignments last) and reads nothing back to the
host, so a GPU never waits on the CPU here: group sizes stay a device tensor (`Plan.offs`), and
dropped rows are masked instead of sliced off.

Two backends compute the same thing: Triton kernels (`moeify.dispatch.triton_permute`, imported only
when used, so CPU installs never need Triton) and plain torch ops. `backend="auto"` takes Triton for CUDA
tensors when it is installed, and on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1`,
Triton's own switch, which it reads when its kernels are defined: tests set it in a fresh process).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Plan:
    """Where each assignment goes when the rows are sorted by expert."""

    order: Tensor  # [N] int64: the assignment each sorted row holds (stable by expert; dropped ones last)
    rows_token: Tensor  # [N] int64: the token each sorted row reads and writes
    row_expert: Tensor  # [N] int64: the expert of each sorted row (E for a dropped one)
    offs: Tensor  # [E] int32: end row of each expert's group (cumulative sizes); offs[-1] = M
    valid: Tensor  # [N, 1] bool: the sorted row holds a kept assignment (row < M)
    num_tokens: int  # T


def plan_by_expert(token_idx: Tensor, expert_idx: Tensor, num_experts: int, num_tokens: int) -> Plan:
    """Sort the N assignments by expert (stable, so ties keep their order); no host synchronisation."""
    order = torch.argsort(expert_idx, stable=True)  # [N]
    row_expert = expert_idx[order]  # [N]
    # Counts by scatter_add, not bincount: CUDA's bincount reads the largest index back to the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_idx.device)  # [E+1]; E = dropped
    counts.scatter_add_(0, expert_idx, torch.ones_like(expert_idx))
    offs = counts[:num_experts].cumsum(0).to(torch.int32)  # [E]
    return Plan(order=order, rows_token=token_idx[order], row_expert=row_expert, offs=offs,
                valid=(row_expert < num_experts).unsqueeze(1), num_tokens=num_tokens)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(t: Tensor, backend: str = "auto") -> str:
    """The backend that runs for tensors like `t`: "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown permutation backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    runs_here = t.device.type == "cuda" or (t.device.type == "cpu" and interpreted)
    return "triton" if runs_here and triton_installed() else "torch"


def _triton():
    """The Triton kernels, imported on first use (CPU installs never need Triton)."""
    from moeify.dispatch import triton_permute

    return triton_permute


def gather_rows(src: Tensor, plan: Plan, scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """The permutation: out[r] = scale[r] * src[rows_token[r]] for kept rows r, zero for dropped ones.

    src [T, D], scale [N] (in sorted-row order) or None -> [N, D]."""
    if resolve_backend(src, backend) == "triton":
        return _triton().gather_rows(src, plan.rows_token, plan.valid, scale)
    out = src.index_select(0, plan.rows_token)  # [N, D]
    if scale is not None:
        out = out * scale.to(out.dtype).unsqueeze(1)
    return out.masked_fill_(~plan.valid, 0)


def combine_rows(src: Tensor, plan: Plan, scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """The inverse: out[t] = sum over sorted rows r of token t of scale[r] * src[r].

    src [N, D] (dropped rows must be zero: they are summed like the others), scale [N] or None -> [T, D].
    The Triton kernel sums each token's rows in float32 in a fixed order (deterministic, no atomics); the
    torch path adds in src's dtype with `index_add_`."""
    if resolve_backend(src, backend) == "triton":
        return _triton().combine_rows(src, plan.rows_token, plan.num_tokens, scale)
    if scale is not None:
        src = src * scale.to(src.dtype).unsqueeze(1)  # [N, D]
    out = src.new_zeros(plan.num_tokens, src.shape[1])  # [T, D]
    return out.index_add_(0, plan.rows_token, src)


__all__ = ["BACKENDS", "Plan", "combine_rows", "gather_rows", "plan_by_expert", "resolve_backend",
           "triton_installed"]
