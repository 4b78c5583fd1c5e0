"""`ExpertParallel`: run an MoE layer's experts sharded across process groups.

Shape legend: T local tokens, D d_model, E experts in all, P ranks expert parallelism spans, L = E / P
experts per rank, S kept assignments here, U_r rows received, S_r assignments received.

The P ranks are addressed by one or more *stages*, outer to inner: one group (flat expert parallelism), or
a `node` group then a `local` group (bi-level, after SMILE: He et al., "Scaling Mixture-of-Experts with
Efficient Bi-level Routing"). Expert-parallel rank r = mixed-radix number of the stage ranks, and it owns
experts [r*L, (r+1)*L). One forward on every rank:
  1. keep the assignments whose expert is not E (dropped ones are never sent);
  2. stage by stage, send each token row to the rank of that stage's group on the path to its experts'
     owner, once per destination (`moeify.parallel.hop`), with the assignments' experts and weights;
     bi-level: first to the right node (one row per token and node crosses nodes), then inside the node;
     with SMILE's bi-level router (`moeify.routers.smile`) a token's experts all lie in one node, so at
     most one row per token crosses;
  3. the owner runs `grouped_ffn` on the rows it received with its L experts, weighting each assignment;
  4. the outputs retrace the stages in reverse and are summed into the token's row at home.
The exchanges are autograd-aware: backward sends the gradients the same way back, and the routing weights'
gradients return with them. Soft routing runs through the same path: its E*S slot inputs are computed
at home and each slot row is one assignment to its expert.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moeify.dispatch import grouped_ffn
from moeify.parallel.comm import CommTimer, reduce_grad
from moeify.parallel.errors import ParallelError
from moeify.parallel.hop import dispatch
from moeify.routing import SoftRouting, SparseRouting

Tensor = torch.Tensor

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def check_divisible(num_experts: int, world: int, where: str = "") -> None:
    if num_experts % world != 0:
        raise ParallelError(
            f"num_experts ({num_experts}){' of ' + where if where else ''} is not divisible by the "
            f"expert-parallel group size ({world}); use a group size that divides {num_experts} "
            "or change num_experts"
        )


def check_groups_fit_nodes(groups: int, nodes: int, where: str) -> None:
    """Bi-level exchange: a router that keeps each token's experts inside one of `groups` contiguous groups
    (`RouterCapabilities.expert_groups`) must have no group straddling two of the mesh's `nodes`, or a token
    would cross the node boundary more than once (bi-level routing's whole point)."""
    if groups > 1 and groups % nodes != 0:
        raise ParallelError(
            f"the router of {where} keeps each token's experts in one of {groups} groups, which does not fit "
            f"the bi-level mesh's {nodes} nodes (a group would straddle two nodes); set router_groups to a "
            f"multiple of {nodes}, or use a mesh whose 'node' size divides {groups}"
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
        group: the expert-parallel process group (default: the world), for flat expert parallelism.
        grad_scale: factor on the expert weights' gradients. The exchange sums the contributions of the
            ranks whose tokens reach an expert; `moeify.parallelize` sets 1/(world size) so that, with
            `dp_group`'s sum, expert gradients are on the same (mean) loss as the data-parallel rest.
        timer: a `CommTimer` that accumulates the time and traffic of the exchanges (benchmarks).
        stages: instead of `group`, the groups a token crosses, outer to inner, e.g. (node, local) for
            bi-level routing; P is the product of their sizes.
        dp_group: the group the expert shards are replicated over (hybrid EP x DP): the expert gradients
            are summed over it inside backward, before they accumulate.
        dedupe: send a token once per destination rank (default) rather than once per assignment.

    After each forward, `last_local_load` [L] int64 holds the assignments each local expert computed
    (from all ranks) and `last_sent` [P_0] the rows this rank sent to each rank of the first stage.
    """

    def __init__(self, group=None, grad_scale: float = 1.0, timer: CommTimer | None = None, *,
                 stages: tuple | None = None, dp_group=None, dedupe: bool = True):
        super().__init__()
        if stages is not None and group is not None:
            raise ParallelError("pass either group (flat expert parallelism) or stages, not both")
        if stages is None:
            stages = (group if group is not None else dist.group.WORLD,)
        self.stages = tuple(stages)
        self.grad_scale = grad_scale
        self.timer = timer
        self.dp_group = dp_group
        self.dedupe = dedupe
        self.last_local_load: Tensor | None = None
        self.last_sent: Tensor | None = None

    @property
    def group(self):
        """The process group of flat expert parallelism (the only stage)."""
        if len(self.stages) != 1:
            raise ParallelError("this layer's expert parallelism has several stages; see .stages")
        return self.stages[0]

    @property
    def stage_sizes(self) -> list[int]:
        return [dist.get_world_size(g) for g in self.stages]

    @property
    def world_size(self) -> int:
        return math.prod(self.stage_sizes)

    @property
    def rank(self) -> int:
        """Expert-parallel rank: the stage ranks as a mixed-radix number, outer stage first."""
        r = 0
        for g, size in zip(self.stages, self.stage_sizes, strict=True):
            r = r * size + dist.get_rank(g)
        return r

    def forward(self, x: Tensor, routing: SparseRouting | SoftRouting, layer) -> Tensor:
        P = self.world_size
        E = layer.num_experts
        check_divisible(E, P, "this layer")
        L = E // P
        w1, b1, w2, b2 = (local_shard(getattr(layer, n)) for n in EXPERT_PARAMS)
        if w1.shape[0] != L:
            raise ParallelError(
                f"this rank holds {w1.shape[0]} experts' weights but expert parallelism over {P} ranks "
                f"needs {L} (= {E} / {P}); shard the model with moeify.parallelize(...) first"
            )
        w1, b1, w2, b2 = (None if w is None else reduce_grad(w, self.grad_scale, self.dp_group)
                          for w in (w1, b1, w2, b2))
        if isinstance(routing, SoftRouting):
            S = routing.dispatch.shape[1] // E
            slots = routing.dispatch.t().to(x.dtype) @ x  # [E*S, D] slot inputs, mixed at home
            rows = torch.arange(E * S, device=x.device)  # [E*S]
            y = self._experts(slots, rows, rows // S, torch.ones_like(rows, dtype=x.dtype),
                              layer, (w1, b1, w2, b2))  # [E*S, D]
            return routing.combine.to(x.dtype) @ y  # [T, D]
        keep = (routing.expert_idx < E).nonzero().squeeze(1)  # [S]
        return self._experts(x, routing.token_idx[keep], routing.expert_idx[keep],
                             routing.weight[keep].to(x.dtype), layer, (w1, b1, w2, b2))  # [T, D]

    def _experts(self, x: Tensor, row: Tensor, expert: Tensor, weight: Tensor, layer, weights) -> Tensor:
        """sum over assignments (row, expert, weight) of weight * expert(x[row]), into x's rows [N, D]."""
        sizes = self.stage_sizes
        L = layer.num_experts // math.prod(sizes)
        owner = torch.div(expert, L, rounding_mode="floor")  # [S] expert-parallel rank owning each expert
        hops = []
        for i, (group, size) in enumerate(zip(self.stages, sizes, strict=True)):
            inner = math.prod(sizes[i + 1:])
            dest = torch.div(owner, inner, rounding_mode="floor") % size  # [S] this stage's digit
            received, hop = dispatch(x, row, dest, expert, weight, size, group, self.dedupe, self.timer)
            hops.append(hop)
            x, row, expert, weight = received.x, received.row, received.payload, received.weight
            owner = torch.div(expert, L, rounding_mode="floor")
            if i == 0:
                with torch.no_grad():
                    self.last_sent = torch.tensor(hop.send_splits)
        local_e = expert - self.rank * L  # [S_r] in [0, L)
        cfg = layer.config
        y = grouped_ffn(x, row, local_e, weight, *weights, layer.expert_activation, cfg.gated,
                        impl=layer.dispatch_impl)  # [U_r, D]
        for hop in reversed(hops):
            y = hop.combine(y)
        with torch.no_grad():
            self.last_local_load = torch.bincount(local_e, minlength=L).cpu()
        return y

    def extra_repr(self) -> str:
        return (f"world_size={self.world_size}, rank={self.rank}, stages={self.stage_sizes}, "
                f"grad_scale={self.grad_scale:g}, dedupe={self.dedupe}, dp={self.dp_group is not None}")
