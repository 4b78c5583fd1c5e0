"""Shard the experts of every `MoELayer` in a model across an expert-parallel group.

Each expert parameter (w1 [E, H1, D], b1 [E, H1], w2 [E, D, H], b2 [E, D]) becomes a DTensor with
placement `Shard(0)` on a 1-D device mesh over the group: the rank keeps only its E/P experts' rows, and
`torch.distributed.checkpoint` knows where every row lives, so checkpoints reshard to any other group
size (or to one process). The router and everything else stay replicated, ordinary tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moeify.parallel.comm import CommTimer
from moeify.parallel.errors import ParallelError
from moeify.parallel.expert import EXPERT_PARAMS, ExpertParallel, check_divisible
from moeify.parallel.group import resolve_group


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


def shard_experts(model: nn.Module, group=None, grad_scale: float = 1.0,
                  timer: CommTimer | None = None) -> list[nn.Module]:
    """Shard every MoE layer's experts over `group` and install an `ExpertParallel` hook; returns the layers.

    The full expert weights of rank 0 are scattered (so ranks need not agree on them beforehand): rank r
    keeps experts [r*E/P, (r+1)*E/P). Raises `ParallelError` when an expert count is not divisible by
    the group size, for soft routers, or when there is no MoE layer.
    """
    group = resolve_group(group)
    world = dist.get_world_size(group)
    layers = moe_layers(model)
    if not layers:
        raise ParallelError("the model has no MoELayer to shard; convert it to MoE first")
    for name, layer in layers:  # validate everything before changing anything
        check_divisible(layer.num_experts, world, f"layer {name or '<root>'!r}")
        # A soft routing dispatches every token to every expert's slots: sharding the experts would need a
        # different exchange than the sparse all-to-all, so it is refused for now.
        if layer.router.caps.soft:
            raise ParallelError(f"layer {name or '<root>'!r} uses the soft router {layer.router.name!r}, "
                                "whose experts see every token; expert parallelism supports sparse routers "
                                "(topk, ...)")
        if isinstance(layer.w1, DTensor):
            raise ParallelError(f"layer {name or '<root>'!r} is already sharded")
    device_type = layers[0][1].w1.device.type
    mesh = DeviceMesh.from_group(group, device_type)
    for _, layer in layers:
        for p in EXPERT_PARAMS:
            param = getattr(layer, p)
            if param is None:
                continue
            with torch.no_grad():
                dt = distribute_tensor(param.detach(), mesh, [Shard(0)])
            setattr(layer, p, nn.Parameter(dt, requires_grad=param.requires_grad))
        layer.expert_parallel = ExpertParallel(group, grad_scale=grad_scale, timer=timer)
    return [layer for _, layer in layers]
