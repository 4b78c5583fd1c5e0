"""Gradient-norm clipping for models mixing sharded (DTensor) and replicated parameters.

`torch.nn.utils.clip_grad_norm_` refuses a mix of DTensor and plain gradients; this one adds the squared
norms of each mesh's shards over that mesh and counts replicated gradients once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

Tensor = torch.Tensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients in place so their global L2 norm is at most `max_norm`; returns the norm.

    Call on every rank with the same parameters (collectives run over each sharded gradient's mesh).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    replicated = torch.zeros((), dtype=torch.float64)
    sharded: dict[tuple, tuple[object, tuple[int, ...], Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            sq = g.to_local().detach().double().pow(2).sum().cpu()
            dims = tuple(i for i, pl in enumerate(g.placements) if isinstance(pl, Shard))
            if dims:  # sum over the mesh dims the gradient is sharded on, once over replicated ones
                key = (id(g.device_mesh), dims)
                prev = sharded.get(key, (g.device_mesh, dims, torch.zeros((), dtype=torch.float64)))[2]
                sharded[key] = (g.device_mesh, dims, prev + sq)
            else:
                replicated += sq
        else:
            replicated += g.detach().double().pow(2).sum().cpu()
    total_sq = replicated
    for mesh, dims, sq in sharded.values():
        t = sq.to("cuda" if mesh.device_type == "cuda" else "cpu")
        for dim in dims:
            dist.all_reduce(t, group=mesh.get_group(dim))
        total_sq = total_sq + t.cpu()
    norm = total_sq.sqrt().float()
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
