"""Autograd-aware all-to-all with uneven splits, timed.

`all_to_all(x, out_splits, in_splits, group)` sends rows x[sum(in_splits[:j]) : ...] to rank j and
returns the rows every rank sent here, concatenated in rank order. Its backward is the same exchange
with the splits swapped, so gradients travel back to the rank that sent each row.

Every rank of the group must call it the same number of times in the same order, forward and backward
(the MoE layers do: one dispatch and one combine exchange per layer per forward).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class CommTimer:
    """Wall-clock seconds spent inside all-to-all calls (forward and backward), for the benchmark.

    On CPU (gloo) the calls are synchronous, so this is the time the step spends exchanging tokens. On
    CUDA (NCCL) the stream is synchronised around each call only while `sync_cuda` is True (it costs
    overlap, so it is off unless a benchmark asks for it).
    """

    def __init__(self, sync_cuda: bool = False):
        self.seconds = 0.0
        self.calls = 0
        self.sync_cuda = sync_cuda

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group,
              timer: CommTimer | None) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    sync = timer is not None and timer.sync_cuda and x.is_cuda
    if sync:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    if sync:
        torch.cuda.synchronize(x.device)
    if timer is not None:
        timer.seconds += time.perf_counter() - start
        timer.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        return _exchange(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer), None, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None,
               timer: CommTimer | None = None) -> Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]; differentiable (see the module docstring)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, timer)


def exchange_counts(counts: Tensor, group=None, timer: CommTimer | None = None) -> Tensor:
    """counts [P * n] int64 (n per destination rank) -> [P * n]: the n values each rank sent here."""
    world = dist.get_world_size(group)
    n = counts.numel() // world
    return _exchange(counts, [n] * world, [n] * world, group, timer)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the gradient by `scale` on the way back."""
    if scale == 1.0:
        return x
    return _ScaleGrad.apply(x, scale)
