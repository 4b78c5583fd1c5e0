"""`ExpertParallel`: run an MoE layer's experts sharded across a process group.

Shape legend: T local tokens, D d_model, E experts in all, P ranks in the group, L = E / P experts per
rank, N local assignments, S assignments this rank sends (kept ones), R rows it receives.

Rank r owns experts [r*L, (r+1)*L). One forward on every rank:
  1. keep the assignments whose expert is not E (dropped ones are never sent) and sort them by expert,
     which groups them by owning rank;
  2. exchange per-expert counts (one small all-to-all), then the token rows (all-to-all, uneven splits);
  3. the owner runs `grouped_ffn` on the rows it received with its L experts (weight 1 per row);
  4. the outputs go back along the reverse exchange and are combined with the routing weights on the
     rank that owns the token, so router gradients stay local.
The exchanges are autograd-aware: backward sends the gradients the same way back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeify.dispatch import grouped_ffn
from moeify.parallel.comm import CommTimer, all_to_all, exchange_counts, scale_grad
from moeify.parallel.errors import ParallelError
from moeify.routing import SparseRouting

Tensor = torch.Tensor

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def check_divisible(num_experts: int, world: int, where: str = "") -> None:
    if num_experts % world != 0:
        raise ParallelError(
            f"num_experts ({num_experts}){' of ' + where if where else ''} is not divisible by the "
            f"expert-parallel group size ({world}); use a group size that divides {num_experts} "
            "or change num_experts"
        )


def local_shard(param: Tensor | None) -> Tensor | None:
    """The rank's own rows of an expert parameter (a DTensor's local shard, or the tensor itself)."""
    if param is None:
        return None
    to_local = getattr(param, "to_local", None)
    return to_local() if to_local is not None else param


class ExpertParallel(nn.Module):
    """The `MoELayer.expert_parallel` hook: forward(x [T, D], routing, layer) -> [T, D].

    Holds no parameters or buffers (the layer keeps its sharded w1/b1/w2/b2), so a model's state-dict
    keys are the same with and without expert parallelism.

    Args:
        group: the expert-parallel process group (default: the world).
        grad_scale: factor on the expert weights' gradients. The exchange sums every rank's
            contribution; data parallelism averages the other gradients over the P ranks, so
            `moeify.parallelize` sets 1/P to keep both on the same (mean) loss. 1.0 here: plain sum.
        timer: a `CommTimer` that accumulates the time spent in the exchanges (benchmarks).

    After each forward, `last_local_load` [L] int64 holds the rows each local expert computed (from all
    ranks) and `last_sent` [P] how many rows this rank sent to each rank.
    """

    def __init__(self, group=None, grad_scale: float = 1.0, timer: CommTimer | None = None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.grad_scale = grad_scale
        self.timer = timer
        self.last_local_load: Tensor | None = None
        self.last_sent: Tensor | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def forward(self, x: Tensor, routing: SparseRouting, layer) -> Tensor:
        P = self.world_size
        E = layer.num_experts
        check_divisible(E, P, "this layer")
        L = E // P
        cfg = layer.config
        w1, b1, w2, b2 = (local_shard(getattr(layer, n)) for n in EXPERT_PARAMS)
        if w1.shape[0] != L:
            raise ParallelError(
                f"this rank holds {w1.shape[0]} experts' weights but expert parallelism over {P} ranks "
                f"needs {L} (= {E} / {P}); shard the model with moeify.parallelize(...) first"
            )
        if self.grad_scale != 1.0:
            w1, b1, w2, b2 = (None if w is None else scale_grad(w, self.grad_scale) for w in (w1, b1, w2, b2))

        # 1. kept assignments, sorted by expert (= grouped by owning rank)
        keep = (routing.expert_idx < E).nonzero().squeeze(1)  # [S]
        expert = routing.expert_idx[keep]  # [S]
        order = torch.argsort(expert, stable=True)  # [S]
        send_rows = keep[order]  # [S] assignment index
        token = routing.token_idx[send_rows]  # [S]
        per_expert = torch.bincount(expert, minlength=E)  # [E] rows this rank sends to each expert

        # 2. counts, then rows
        # [P*L]: for each source rank, the rows it sends to each of this rank's experts
        recv_per_expert = exchange_counts(per_expert, self.group, self.timer)
        send_splits = per_expert.view(P, L).sum(1).tolist()  # [P]
        recv_matrix = recv_per_expert.view(P, L)
        recv_splits = recv_matrix.sum(1).tolist()  # [P]
        x_recv = all_to_all(x[token], recv_splits, send_splits, self.group, self.timer)  # [R, D]

        # 3. local experts; row i of x_recv belongs to local expert local_e[i]
        R = x_recv.shape[0]
        local_e = torch.repeat_interleave(torch.arange(L, device=x.device).repeat(P),
                                          recv_matrix.reshape(-1))  # [R]
        if R > 0:
            rows = torch.arange(R, device=x.device)
            ones = torch.ones(R, dtype=x.dtype, device=x.device)  # [R] routing weights apply at home
            y_recv = grouped_ffn(x_recv, rows, local_e, ones, w1, b1, w2, b2, layer.expert_activation,
                                 cfg.gated, impl=layer.dispatch_impl)  # [R, D]
        else:
            # Nothing to compute, but keep the graph connected so that backward still runs both
            # exchanges here (every rank must join every collective) and the local experts get zero
            # gradients rather than none.
            anchor = sum(w.sum() for w in (w1, b1, w2, b2) if w is not None)
            y_recv = x_recv + 0.0 * anchor  # [0, D]

        # 4. back to the token owners, combine with routing weights
        y = all_to_all(y_recv, send_splits, recv_splits, self.group, self.timer)  # [S, D]
        w = routing.weight[send_rows].to(y.dtype).unsqueeze(1)  # [S, 1]
        out = torch.zeros_like(x).index_add(0, token, y * w)  # [T, D]

        with torch.no_grad():
            self.last_local_load = recv_matrix.sum(0).detach().cpu()
            self.last_sent = torch.tensor(send_splits)
        return out

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, rank={self.rank}, grad_scale={self.grad_scale:g}"
