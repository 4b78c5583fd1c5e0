"""Dispatch: run the experts on routed tokens.

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts, S slots per
expert, N assignments.

`grouped_ffn` is the entry point the layer calls (`MoELayer.dispatch_impl` picks `impl`):
  "fast"        the `moeify::grouped_ffn` custom ops: on the CPU a loop of per-expert GEMMs
                (`moeify.dispatch.ops`), on CUDA the grouped-GEMM path (`moeify.dispatch.grouped`).
  "grouped_mm"  the grouped-GEMM path (expert permutation, `torch._grouped_mm`, inverse permutation) on
                any device, as an autograd function: how the GPU path is tested on the CPU.
  "reference"   the slow, obviously correct reference.
An activation given as a callable (not a name) runs the pure-torch grouped path (`torch_path`) whatever
`impl` asks for, except "reference".
"""

from __future__ import annotations

import torch

from moeify.activations import Activation, apply_expert_activation
from moeify.dispatch.buffers import release_grad_buffers, set_grad_buffer_recycling
from moeify.dispatch.grouped import grouped_mm_ffn
from moeify.dispatch.ops import grouped_ffn_op, grouped_ffn_train_op
from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts
from moeify.dispatch.torch_path import torch_grouped_ffn

Tensor = torch.Tensor

_IMPLS = ("fast", "reference", "grouped_mm")


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"unknown dispatch impl {impl!r}; valid: {', '.join(_IMPLS)}")


def grouped_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: Activation, gated: bool,
                impl: str = "fast", dropout: float = 0.0) -> Tensor:
    """x [T, D] -> [T, D]; see `reference_grouped_ffn` for the exact meaning.

    `dropout` > 0 (expert dropout, training only: the caller passes 0 in eval) runs the reference path
    whatever `impl`: plain autograd ops, one GEMM pair per expert, with dropout on the hidden activations.
    The fused ops have no dropout; expert dropout is a fine-tuning setting where that cost is acceptable.

    When a gradient is wanted, the training variant of the op runs: same forward, but it hands the
    pre-activation to the backward instead of the backward recomputing it (one GEMM saved). Under
    `torch.export` the public op `moeify::grouped_ffn` is always used: it is what the ONNX lowering maps.
    """
    _check_impl(impl)
    if impl == "reference" or dropout > 0:
        return reference_grouped_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated,
                                     dropout)
    if not isinstance(activation, str):
        return torch_grouped_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)
    if impl == "grouped_mm":
        return grouped_mm_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, w1, b1, w2, b2))
    if wants_grad and not torch.compiler.is_exporting():
        return grouped_ffn_train_op(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)[0]
    return grouped_ffn_op(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)


def fast_soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                      b2: Tensor | None, activation: Activation, gated: bool) -> Tensor:
    """Soft MoE with batched matmuls over the stacked weights (plain ops; autograd as usual).

    Every expert sees exactly S slots, so the experts are one `bmm` each way, no Python loop, and the weight
    gradients come out stacked [E, ...] with no per-expert indexing.
    """
    E = w1.shape[0]
    S = dispatch.shape[1] // E
    slots = (dispatch.t().to(x.dtype) @ x).view(E, S, -1)  # [E, S, D]
    if b1 is None:
        h = torch.bmm(slots, w1.transpose(1, 2))  # [E, S, H1]
    else:
        h = torch.baddbmm(b1.unsqueeze(1), slots, w1.transpose(1, 2))  # [E, S, H1]
    a = apply_expert_activation(h, activation, gated)  # [E, S, H]
    if b2 is None:
        y = torch.bmm(a, w2.transpose(1, 2))  # [E, S, D]
    else:
        y = torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2))  # [E, S, D]
    return combine.to(x.dtype) @ y.reshape(E * S, -1)  # [T, D]


def soft_experts(x: Tensor, dispatch: Tensor, combine: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                 b2: Tensor | None, activation: Activation, gated: bool, impl: str = "fast",
                 dropout: float = 0.0) -> Tensor:
    """Soft MoE expert computation; see `reference_soft_experts`. x [T, D]; dispatch, combine [T, E*S].
    `dropout` > 0 runs the reference path, as in `grouped_ffn`.

    Every expert gets exactly S slots, so the fast path is already one batched GEMM each way with no
    permutation: "grouped_mm" runs it too."""
    _check_impl(impl)
    if impl == "reference" or dropout > 0:
        return reference_soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation, gated, dropout)
    return fast_soft_experts(x, dispatch, combine, w1, b1, w2, b2, activation, gated)


__all__ = ["grouped_ffn", "soft_experts", "fast_soft_experts", "torch_grouped_ffn", "reference_grouped_ffn",
           "reference_soft_experts", "release_grad_buffers", "set_grad_buffer_recycling"]
