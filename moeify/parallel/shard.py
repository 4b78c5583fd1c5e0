"""Shard the experts of every `MoELayer` in a model across an expert-parallel group or device mesh.

Each expert parameter (w1 [E, H1, D], b1 [E, H1], w2 [E, D, H], b2 [E, D]) becomes a DTensor: `Shard(0)`
on every expert-parallel mesh dimension (the rank keeps only its E/P experts' rows) and `Replicate()` on a
`dp` dimension, so `torch.distributed.checkpoint` knows where every row lives and checkpoints reshard to
any other layout (or to one process). The router and everything else stay replicated, ordinary tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moeify.parallel.comm import CommTimer
from moeify.parallel.errors import ParallelError
from moeify.parallel.expert import EXPERT_PARAMS, ExpertParallel, check_divisible, check_groups_fit_nodes
from moeify.parallel.group import resolve_layout

DP_DIM = "dp"  # the mesh dimension expert shards are replicated over


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from moeify.layer import MoELayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Fully qualified name -> parameter, for the expert weights of every MoE layer (w1, b1, w2, b2).

    These are the parameters data parallelism must leave alone (DDP: ignore them; FSDP2: ignored_params).
    """
    out = {}
    for name, layer in moe_layers(model):
        for p in EXPERT_PARAMS:
            param = getattr(layer, p)
            if param is not None:
                out[f"{name}.{p}" if name else p] = param
    return out


def _mesh_layout(mesh: DeviceMesh, bilevel: bool) -> tuple[list, list, object]:
    """(placements, expert-parallel stage groups outer to inner, dp group or None) for an `ep_mesh`."""
    names = mesh.mesh_dim_names
    if names is None and mesh.ndim > 1:
        raise ParallelError(f"a {mesh.ndim}-D ep_mesh needs mesh_dim_names: 'dp' for the data-parallel "
                            "replicas and one expert-parallel dim (e.g. ('dp', 'ep')), or two for "
                            "bilevel=True (e.g. ('node', 'local'))")
    names = names or ("ep",)
    ep_dims = [n for n in names if n != DP_DIM]
    want = 2 if bilevel else 1
    if len(ep_dims) != want:
        kind = "bilevel=True" if bilevel else "flat expert parallelism"
        example = ("node", "local") if bilevel else ("dp", "ep")
        raise ParallelError(f"ep_mesh dims {names}: {kind} needs {want} expert-parallel dim(s) besides an "
                            f"optional {DP_DIM!r}, got {ep_dims}; e.g. mesh_dim_names={example}")
    placements = [Replicate() if n == DP_DIM else Shard(0) for n in names]
    stages = [mesh.get_group(n) if mesh.ndim > 1 else mesh.get_group() for n in ep_dims]
    dp_group = mesh.get_group(DP_DIM) if DP_DIM in names else None
    return placements, stages, dp_group


def shard_experts(model: nn.Module, group=None, grad_scale: float = 1.0, timer: CommTimer | None = None, *,
                  mesh: DeviceMesh | None = None, bilevel: bool = False,
                  dedupe: bool = True) -> list[nn.Module]:
    """Shard every MoE layer's experts and install an `ExpertParallel` hook; returns the layers.

    Either over `group` (flat, default the world), or over `mesh`: a 1-D mesh (flat), a 2-D mesh named
    ('dp', 'ep') whose expert shards are replicated over 'dp' (their gradients are summed over it in
    backward), or with `bilevel=True` a mesh named ('node', 'local') (optionally with 'dp' first): tokens
    cross nodes once per node, then move inside it. `dedupe`: send a token once per destination rank.

    The full expert weights of global rank 0 are scattered (so ranks need not agree on them beforehand):
    expert-parallel rank r keeps experts [r*E/P, (r+1)*E/P). Raises `ParallelError` when an expert count
    is not divisible by P, for a mesh it cannot read, for a router tied to its experts' weights
    (`RouterCapabilities.reads_expert_weights`), or when there is no MoE layer.
    """
    group, _ = resolve_layout(group, mesh, bilevel)
    layers = moe_layers(model)
    if not layers:
        raise ParallelError("the model has no MoELayer to shard; convert it to MoE first")
    if mesh is None:
        mesh = DeviceMesh.from_group(group, next(layers[0][1].parameters()).device.type)
        placements, stages, dp_group = [Shard(0)], [group], None
    else:
        placements, stages, dp_group = _mesh_layout(mesh, bilevel)
    world = 1
    for g in stages:
        world *= dist.get_world_size(g)
    for name, layer in layers:  # validate everything before changing anything
        check_divisible(layer.num_experts, world, f"layer {name or '<root>'!r}")
        if layer.config.expert_param != "dense":
            raise ParallelError(f"layer {name or '<root>'!r} has MPO experts (expert_param='mpo'), which are not "
                                "expert-parallel yet (their central tensor is shared by all experts); train it "
                                "with data parallelism, or convert with expert_param='dense'")
        if bilevel:
            nodes = dist.get_world_size(stages[0])
            check_groups_fit_nodes(layer.router.caps.expert_groups, nodes, f"layer {name or '<root>'!r}")
        if layer.router.caps.reads_expert_weights:  # a tied router needs every expert's w1 on every rank
            raise ParallelError(f"the router of layer {name or '<root>'!r} routes on its experts' weights, "
                                "which expert parallelism shards over ranks; use router='topk' with "
                                "router_init='avg_k' (a learned router starting at the same mean keys)")
        if isinstance(layer.w1, DTensor):
            raise ParallelError(f"layer {name or '<root>'!r} is already sharded")
    for _, layer in layers:
        for p in EXPERT_PARAMS:
            param = getattr(layer, p)
            if param is None:
                continue
            with torch.no_grad():
                dt = distribute_tensor(param.detach(), mesh, placements)
            setattr(layer, p, nn.Parameter(dt, requires_grad=param.requires_grad))
        layer.expert_parallel = ExpertParallel(grad_scale=grad_scale, timer=timer, stages=stages,
                                               dp_group=dp_group, dedupe=dedupe)
    return [layer for _, layer in layers]
