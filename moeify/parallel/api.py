"""`parallelize`: expert parallelism for the experts, data parallelism for everything else."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moeify.parallel.comm import CommTimer
from moeify.parallel.errors import ParallelError
from moeify.parallel.group import resolve_layout
from moeify.parallel.shard import expert_parameters, shard_experts

DP_MODES = ("ddp", "fsdp", None)


def parallelize(model: nn.Module, ep_group=None, dp_mesh: DeviceMesh | None = None, dp: str | None = "ddp",
                timer: CommTimer | None = None, *, ep_mesh: DeviceMesh | None = None, bilevel: bool = False,
                dedupe: bool = True) -> nn.Module:
    """Shard a converted model's experts over `ep_group` and data-parallelise the rest; returns the model.

    Call it on every rank of the group, after `torch.distributed.init_process_group` and after moving the
    model to its device. Each rank feeds its own batch (the ranks are data-parallel for the tokens).

    Args:
        ep_group: process group the experts are sharded over (default: the world). Every MoE layer's
            expert count must be divisible by its size P; rank r keeps experts [r*E/P, (r+1)*E/P) and
            rank 0's full expert weights are scattered.
        dp_mesh: 1-D device mesh over the same ranks for the non-expert parameters. Default: a new
            group over those ranks, so data-parallel all-reduces never interleave with the expert
            exchanges on one communicator.
        dp: "ddp" (default) wraps the model in DistributedDataParallel with the expert parameters
            ignored; "fsdp" applies FSDP2 `fully_shard` to the whole model with the expert parameters
            as `ignored_params`; None leaves data parallelism of the non-expert parameters to you (use
            `moeify.parallel.expert_parameters(model)` to exclude the experts).
        timer: optional `CommTimer` that accumulates the time and traffic of the expert exchanges.
        ep_mesh: instead of `ep_group`, a device mesh over all the ranks: 1-D (flat, like ep_group);
            named ('dp', 'ep') for hybrid EP x DP (experts sharded over 'ep', each shard replicated over
            'dp'; e.g. `init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "ep"))`); with
            `bilevel=True`, named ('node', 'local') or ('dp', 'node', 'local'): bi-level exchange.
        bilevel: route tokens node first, then inside the node (two all-to-all stages; SMILE). Any router
            works; SMILE's bi-level router (`router="smile"`, `router_groups` a multiple of the mesh's node
            count) sends each token to one node only. A router whose expert groups straddle two nodes
            (`RouterCapabilities.expert_groups`) raises ParallelError.
        dedupe: send a token once per destination rank (default), not once per expert assignment.

    Gradients: DDP/FSDP average the non-expert gradients over all W ranks. An expert's gradient is the sum
    of the contributions of the tokens that reached it (from its expert-parallel group) and, with a 'dp'
    dim, summed over the replicas; `parallelize` scales it by 1/W, so the whole model trains on the mean
    loss over ranks, exactly like single-process training on the concatenated batches. With dp=None the
    expert gradients are handled all the same: average the rest over the W ranks yourself.
    """
    if dp not in DP_MODES:
        raise ParallelError(f"unknown dp {dp!r}; valid: 'ddp', 'fsdp', None")
    ep_group, ranks = resolve_layout(ep_group, ep_mesh, bilevel)
    if dp_mesh is not None:
        if dp_mesh.ndim != 1 or sorted(dp_mesh.mesh.flatten().tolist()) != ranks:
            raise ParallelError(
                f"dp_mesh must be a 1-D mesh over all the expert-parallel ranks {ranks}, got "
                f"{dp_mesh.mesh.tolist()}; for expert shards replicated over data-parallel groups pass "
                "ep_mesh with a 'dp' dim"
            )
    shard_experts(model, ep_group, grad_scale=1.0 / len(ranks), timer=timer, mesh=ep_mesh, bilevel=bilevel,
                  dedupe=dedupe)
    if dp is None:
        return model
    experts = expert_parameters(model)
    device_type = next(iter(experts.values())).device.type
    if dp_mesh is None:
        dp_group = dist.new_group(ranks, use_local_synchronization=True)
        dp_mesh = DeviceMesh.from_group(dp_group, device_type)
    if dp == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, list(experts))
        device_ids = None
        if device_type == "cuda":
            device_ids = [next(iter(experts.values())).device.index]
        return DDP(model, process_group=dp_mesh.get_group(), device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=dp_mesh, ignored_params=set(experts.values()))
    return model
