"""Autograd-aware all-to-all with uneven splits, timed and its traffic counted.

`all_to_all(x, out_splits, in_splits, group)` sends rows x[sum(in_splits[:j]) : ...] to rank j and
returns the rows every rank sent here, concatenated in rank order. Its backward is the same exchange
with the splits swapped, so gradients travel back to the rank that sent each row.

Every rank of the group must call it the same number of times in the same order, forward and backward
(the MoE layers do: one dispatch and one combine exchange per layer per forward).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class CommTimer:
    """Wall-clock seconds spent inside all-to-all calls (forward and backward) and the traffic they send.

    On CPU (gloo) the calls are synchronous, so this is the time the step spends exchanging tokens. On
    CUDA (NCCL) the stream is synchronised around each call only while `sync_cuda` is True (it costs
    overlap, so it is off unless a benchmark asks for it).

    Traffic is what this rank sends to *other* ranks: `bytes` and `messages` (non-empty sends). With
    `node_of` (global rank -> node id), `node_bytes` and `node_messages` count the part that leaves this
    rank's node.
    """

    def __init__(self, sync_cuda: bool = False, node_of: Callable[[int], int] | None = None):
        self.sync_cuda = sync_cuda
        self.node_of = node_of
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self.bytes = self.messages = self.node_bytes = self.node_messages = 0

    def count(self, x: Tensor, in_splits: list[int], group) -> None:
        """Add the sends of one exchange of x's rows split by `in_splits` over `group`."""
        row_bytes = x[:1].numel() * x.element_size() if x.shape[0] else 0
        ranks = dist.get_process_group_ranks(group)
        me = dist.get_rank()
        for dst, rows in zip(ranks, in_splits, strict=True):
            if rows == 0 or dst == me:
                continue
            self.bytes += rows * row_bytes
            self.messages += 1
            if self.node_of is not None and self.node_of(dst) != self.node_of(me):
                self.node_bytes += rows * row_bytes
                self.node_messages += 1


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
        timer.count(x, in_splits, group if group is not None else dist.group.WORLD)
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


def exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group=None,
             timer: CommTimer | None = None) -> Tensor:
    """The all-to-all of `all_to_all` without autograd (index metadata)."""
    return _exchange(x, list(out_splits), list(in_splits), group, timer)


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, group):
        ctx.scale, ctx.group = scale, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.scale if ctx.scale != 1.0 else grad.clone()
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def reduce_grad(x: Tensor, scale: float, group=None) -> Tensor:
    """Identity forward; on the way back the gradient is multiplied by `scale` and, with `group`, summed
    over that group (an all-reduce in the backward graph, so every rank must run the same graph)."""
    if scale == 1.0 and group is None:
        return x
    return _ReduceGrad.apply(x, scale, group)
