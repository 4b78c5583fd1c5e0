"""The process group expert parallelism runs over."""

from __future__ import annotations

import torch.distributed as dist

from moeify.parallel.errors import ParallelError


def resolve_group(group=None):
    """`group`, or the default (world) group; ParallelError when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("expert parallelism needs torch.distributed initialised "
                            "(torch.distributed.init_process_group, e.g. under torchrun)")
    return group if group is not None else dist.group.WORLD


def resolve_layout(group, mesh, bilevel: bool) -> tuple[object, list[int]]:
    """Check the group/mesh arguments of expert parallelism; returns (group or None with a mesh, ranks)."""
    if mesh is not None and group is not None:
        raise ParallelError("pass either a process group or a device mesh for expert parallelism, not both")
    if bilevel and mesh is None:
        raise ParallelError("bilevel=True needs a device mesh named ('node', 'local'); pass ep_mesh=")
    if mesh is None:
        group = resolve_group(group)
        return group, sorted(dist.get_process_group_ranks(group))
    resolve_group()
    return None, sorted(mesh.mesh.flatten().tolist())
