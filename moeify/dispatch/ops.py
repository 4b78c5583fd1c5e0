"""`torch.ops.moeify.grouped_ffn`: the dispatch custom op.

Schema (fixed; the ONNX lowering maps this op):
  moeify::grouped_ffn(Tensor x, Tensor token_idx, Tensor expert_idx, Tensor weight, Tensor w1, Tensor? b1,
                      Tensor w2, Tensor? b2, str activation, bool gated) -> Tensor
Meaning: exactly `reference_grouped_ffn` (x [T, D] -> [T, D]).

This first version computes forward and backward through the reference; the grouped CPU kernel
replaces the bodies without changing the schema.
"""

from __future__ import annotations

import torch

from moeify.dispatch.reference import reference_grouped_ffn

Tensor = torch.Tensor


@torch.library.custom_op("moeify::grouped_ffn", mutates_args=())
def grouped_ffn_op(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                   b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str, gated: bool) -> Tensor:
    with torch.no_grad():
        return reference_grouped_ffn(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)


@grouped_ffn_op.register_fake
def _(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs[:8]])
    ctx.has_b1, ctx.has_b2 = inputs[5] is not None, inputs[7] is not None
    ctx.activation, ctx.gated = inputs[8], inputs[9]


def _backward(ctx, grad_out):
    x, token_idx, expert_idx, weight, w1, b1, w2, b2 = ctx.saved_tensors
    b1 = b1 if ctx.has_b1 else None
    b2 = b2 if ctx.has_b2 else None
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, w1, b1, w2, b2)]
    lx, lweight, lw1, lb1, lw2, lb2 = leaves
    with torch.enable_grad():
        out = reference_grouped_ffn(lx, token_idx, expert_idx, lweight, lw1, lb1, lw2, lb2, ctx.activation,
                                    ctx.gated)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    gx, gweight, gw1, gb1, gw2, gb2 = [next(grads) if t is not None else None for t in leaves]
    return gx, None, None, gweight, gw1, gb1, gw2, gb2, None, None


grouped_ffn_op.register_autograd(_backward, setup_context=_setup_context)
