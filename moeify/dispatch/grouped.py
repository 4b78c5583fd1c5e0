"""The grouped-GEMM dispatch: moeify's expert computation as one permutation, two grouped GEMMs and one
combine, with no loop over experts and no host synchronisation (the GPU path; it runs on the CPU too).

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts,
N assignments (= sorted rows), M kept assignments (expert index < E).

Forward (same meaning as `reference_grouped_ffn`):
    plan   = sort assignments by expert                         order [N], offs [E] (device)
    xs     = gather_rows(x)                                     [N, D]   permutation (Triton or torch)
    h      = grouped_linear(xs, w1^T) + b1[expert]              [N, H1]  one grouped GEMM
    a      = act(h)  (gated: act(gate) * up)                    [N, H]
    y      = grouped_linear(a, w2^T) + b2[expert]               [N, D]   one grouped GEMM
    out    = combine_rows(y, scale=weight)                      [T, D]   inverse permutation
Dropped assignments sort last and their rows are zero throughout, so shapes stay static (N rows) and
nothing is sliced by a count read from the device.

Backward: the gradient GEMMs written out (torch's own `_grouped_mm` autograd fails on the CPU):
    gos = gather_rows(grad_out); gy = gos * weight              [N, D]
    gw2 = grouped_weight_grad(gy, a); gb2 = sum of gy by expert [E, D, H], [E, D]
    ga  = grouped_linear(gos, w2) * weight                      [N, H]
    gh  = ga * act'(h)  (gated: both halves)                    [N, H1]
    gw1 = grouped_weight_grad(gh, xs); gb1 = sum of gh by expert [E, H1, D], [E, H1]
    gx  = combine_rows(grouped_linear(gh, w1))                  [T, D]
    gweight = <gos, y> per row, scattered back to assignment order

The forward and backward here have exactly the signatures of the CPU kernel's (`moeify.dispatch.ops`),
and are registered as the CUDA kernels of the three dispatch ops (`moeify::grouped_ffn`,
`moeify::grouped_ffn_train`, `moeify::grouped_ffn_backward`), so on a GPU `impl="fast"` runs this path
through the same custom ops, fake kernels and autograd the CPU uses (torch.compile and torch.export
included). `impl="grouped_mm"` runs it on any device through `GroupedFFN`, an autograd function over the
same two functions: that is how CI tests it on the CPU.

Host synchronisations left: none in the forward or backward with `_grouped_mm`'s fused kernel (CUDA,
bfloat16, compute capability 9.0+). torch's own `_grouped_mm` fallback (float32/float16 on CUDA) and the
loop over experts (`moeify.dispatch.grouped_mm`, where `_grouped_mm` cannot run) read the group sizes on
the host once per GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeify.dispatch import ops
from moeify.dispatch.grouped_mm import grouped_linear, grouped_weight_grad
from moeify.dispatch.permute import Plan, combine_rows, gather_rows, plan_by_expert

Tensor = torch.Tensor


def _row_bias(b: Tensor | None, plan: Plan) -> Tensor | None:
    """b [E, P] -> [N, P]: each sorted row's expert bias, zero on dropped rows (expert index E)."""
    if b is None:
        return None
    return F.pad(b, (0, 0, 0, 1)).index_select(0, plan.row_expert)  # [N, P]


def _sum_by_expert(g: Tensor, plan: Plan, num_experts: int) -> Tensor:
    """g [N, P] -> [E, P]: the sum of each expert's rows (the bias gradient); dropped rows go to row E."""
    out = g.new_zeros(num_experts + 1, g.shape[1])  # [E+1, P]
    return out.index_add_(0, plan.row_expert, g)[:num_experts]


def _first_layer(xs: Tensor, plan: Plan, w1: Tensor, b1: Tensor | None, activation: str,
                 gated: bool) -> tuple[Tensor, Tensor]:
    """xs [N, D] -> h [N, H1] (pre-activation), a [N, H]; dropped rows zero in both (every activation
    maps 0 to 0)."""
    h = grouped_linear(xs, w1.transpose(1, 2), plan.offs)  # [N, H1]
    if b1 is not None:
        h = h.add_(_row_bias(b1, plan))
    a = h.new_empty(h.shape[0], h.shape[1] // 2 if gated else h.shape[1])  # [N, H]
    return h, ops._activate(h, activation, gated, out=a)


def forward(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor, b1: Tensor | None,
            w2: Tensor, b2: Tensor | None, activation: str, gated: bool,
            keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out [T, D], and when `keep`, h [N, H1], a [N, H], y [N, D] in expert-sorted row order, dropped rows
    zero (the CPU kernel's contract); without `keep` those three are empty."""
    E = w1.shape[0]
    plan = plan_by_expert(token_idx, expert_idx, E, x.shape[0])
    xs = gather_rows(x, plan)  # [N, D]
    h, a = _first_layer(xs, plan, w1, b1, activation, gated)  # [N, H1], [N, H]
    y = grouped_linear(a, w2.transpose(1, 2), plan.offs)  # [N, D]
    if b2 is not None:
        y = y.add_(_row_bias(b2, plan))
    out = combine_rows(y, plan, scale=weight.index_select(0, plan.order))  # [T, D]
    if not keep:
        h, a, y = x.new_empty(0, w1.shape[1]), x.new_empty(0, w2.shape[2]), x.new_empty(0, x.shape[1])
    return out, h, a, y


def _hidden_grad(ga: Tensor, h: Tensor, activation: str, gated: bool) -> Tensor:
    """ga [N, H] (grad wrt a; overwritten), h [N, H1] -> gh [N, H1], the grad wrt h."""
    gh = torch.empty_like(h)  # [N, H1]
    if not gated:
        return ops._act_backward(ga, h, activation, out=gh)
    gate, up = h.chunk(2, dim=-1)  # [N, H] each
    H = gate.shape[1]
    ops._act_into(gate, activation, out=gh[:, H:]).mul_(ga)  # grad wrt up = act(gate) * ga
    ops._act_backward(ga.mul_(up), gate, activation, out=gh[:, :H])  # grad wrt gate
    return gh


def backward(grad_out: Tensor, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
             b1: Tensor | None, w2: Tensor, b2: Tensor | None, saved: list[Tensor] | None, activation: str,
             gated: bool, output_mask: list[bool]) -> list[Tensor]:
    """Grads of (x, weight, w1, b1, w2, b2) (see the module docstring); an unwanted or absent one is an
    empty tensor. `saved` is the training forward's [h, a, y], or None (h and a are recomputed; y is not
    needed: <gos, y> = <gos @ w2, a> + <gos, b2>)."""
    want_x, want_weight, want_w1, want_b1, want_w2, want_b2 = output_mask
    want_b1, want_b2 = want_b1 and b1 is not None, want_b2 and b2 is not None
    E = w1.shape[0]
    plan = plan_by_expert(token_idx, expert_idx, E, x.shape[0])
    xs = gather_rows(x, plan) if (want_w1 or saved is None) else None  # [N, D]
    h, a, y = saved if saved is not None else (*_first_layer(xs, plan, w1, b1, activation, gated), None)
    ws = weight.index_select(0, plan.order)  # [N] combine weights, sorted
    gos = gather_rows(grad_out, plan)  # [N, D]: grad wrt the combined rows, dropped rows zero
    grads: list[Tensor | None] = [None] * 6  # x, weight, w1, b1, w2, b2
    if want_w2 or want_b2:
        gy = gos * ws.to(gos.dtype).unsqueeze(1)  # [N, D]: grad wrt y
        grads[4] = grouped_weight_grad(gy, a, plan.offs) if want_w2 else None  # [E, D, H]
        grads[5] = _sum_by_expert(gy, plan, E) if want_b2 else None  # [E, D]
    want_gh = want_x or want_w1 or want_b1
    ga = grouped_linear(gos, w2, plan.offs) if (want_gh or (want_weight and y is None)) else None  # [N, H]
    if want_weight:
        if y is not None:
            g_rows = torch.linalg.vecdot(gos, y)  # [N]
        else:
            g_rows = torch.linalg.vecdot(ga, a)  # [N]: <gos, a @ w2^T>
            if b2 is not None:
                g_rows = g_rows + torch.linalg.vecdot(gos, _row_bias(b2, plan))  # + <gos, b2[e]>
        grads[1] = torch.zeros_like(weight).index_copy_(0, plan.order, g_rows.to(weight.dtype))  # [N]
    if want_gh:
        gh = _hidden_grad(ga.mul_(ws.to(ga.dtype).unsqueeze(1)), h, activation, gated)  # [N, H1]
        grads[2] = grouped_weight_grad(gh, xs, plan.offs) if want_w1 else None  # [E, H1, D]
        grads[3] = _sum_by_expert(gh, plan, E) if want_b1 else None  # [E, H1]
        if want_x:
            grads[0] = combine_rows(grouped_linear(gh, w1, plan.offs), plan)  # [T, D]
    like = (x, weight, w1, b1, w2, b2)
    return [g if g is not None else ops._unwanted(t, x) for g, t in zip(grads, like, strict=True)]


class GroupedFFN(torch.autograd.Function):
    """`forward` and `backward` as an autograd function, on any device (`impl="grouped_mm"`)."""

    @staticmethod
    def forward(ctx, x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
        nig = ctx.needs_input_grad
        ctx.output_mask = [bool(nig[i]) for i in (0, 3, 4, 5, 6, 7)]  # (x, weight, w1, b1, w2, b2)
        ctx.activation, ctx.gated, ctx.has_b1, ctx.has_b2 = activation, gated, b1 is not None, b2 is not None
        out, h, a, y = forward(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated,
                               keep=any(ctx.output_mask))
        none = x.new_empty(0)
        ctx.save_for_backward(x, token_idx, expert_idx, weight, w1, none if b1 is None else b1, w2,
                              none if b2 is None else b2, h, a, y)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, token_idx, expert_idx, weight, w1, b1, w2, b2, h, a, y = ctx.saved_tensors
        grads = backward(grad_out.contiguous(), x, token_idx, expert_idx, weight, w1,
                         b1 if ctx.has_b1 else None, w2, b2 if ctx.has_b2 else None, [h, a, y],
                         ctx.activation, ctx.gated, ctx.output_mask)
        gx, gweight, gw1, gb1, gw2, gb2 = (g if wanted else None for g, wanted in zip(grads, ctx.output_mask,
                                                                                        strict=True))
        return gx, None, None, gweight, gw1, gb1, gw2, gb2, None, None


def grouped_mm_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, w1: Tensor,
                   b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str, gated: bool) -> Tensor:
    """x [T, D] -> [T, D]: `reference_grouped_ffn`'s meaning, computed by the grouped-GEMM path."""
    return GroupedFFN.apply(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated)


# ---------------------------------------------------------------------------------- CUDA kernels of the ops

@ops.grouped_ffn_op.register_kernel("cuda")
def _(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
    return forward(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated, keep=False)[0]


@ops.grouped_ffn_train_op.register_kernel("cuda")
def _(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated):
    return forward(x, token_idx, expert_idx, weight, w1, b1, w2, b2, activation, gated, keep=True)


@ops.grouped_ffn_backward_op.register_kernel("cuda")
def _(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, h, a, y, activation, gated, output_mask):
    saved = None if h is None or a is None or y is None else [h, a, y]
    return backward(grad_out, x, token_idx, expert_idx, weight, w1, b1, w2, b2, saved, activation, gated,
                    list(output_mask))


__all__ = ["GroupedFFN", "backward", "forward", "grouped_mm_ffn"]
