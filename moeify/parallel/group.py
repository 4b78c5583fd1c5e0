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
