"""Recycled memory for the stacked expert-weight gradients the dispatch backward returns, and for the
large intermediates its training forward saves for the backward (`empty_saved`).

Why: glibc serves every allocation above 32 MiB with a fresh `mmap` and unmaps it on `free`, so each
backward that allocates a new stacked gradient ([E, H1, D]: 256 MiB at E=64, d=512, d_ff=2048) pays one
page fault and one zeroed page per 4 KiB the first time it writes it. Measured on the 2-core dev machine:
writing a fresh 512 MiB gradient took about 4x as long as writing the same bytes into memory already
mapped (`python benchmarks/moe_layer.py --no-recycle` shows the step-level effect). A dense model's
per-layer gradients, and an HF-style per-expert ModuleList's 4 MiB ones, are small enough for malloc to
recycle, so without this moeify's stacked layout was the one paying.

How: a buffer handed out stays in the pool. It is handed out again only when no tensor refers to its
storage any more (the storage's use count is 1: the pool's own reference), so a gradient still held as
`.grad`, kept by the user, or viewed anywhere is never overwritten. After `zero_grad(set_to_none=True)`
the next backward writes into the same, already-mapped pages. This is what a caching allocator does:
memory once used for gradients stays reserved for them. `release_grad_buffers()` gives the unused part
back (the analogue of `torch.cuda.empty_cache()`); `set_grad_buffer_recycling(False)` turns it off.

Only CPU tensors of at least `MIN_BYTES` go through the pool: smaller ones malloc recycles itself, and
other devices have their own caching allocators.
"""

from __future__ import annotations

import math
import threading

import torch

Tensor = torch.Tensor

MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller blocks are recycled by malloc already
SAVED_MIN_BYTES = 32 << 20  # the same, for the forward's saved intermediates (tests lower MIN_BYTES only)

_lock = threading.Lock()
_pool: dict[int, list[torch.UntypedStorage]] = {}  # nbytes -> storages the pool owns (free or in use)
# The reuse test needs torch's storage use count (a private binding); without it, no recycling.
_CAN_RECYCLE = hasattr(torch._C, "_storage_Use_Count")
_enabled = _CAN_RECYCLE


def set_grad_buffer_recycling(enabled: bool) -> bool:
    """Turn the recycling on or off (it is on by default); returns the previous setting.

    Turning it off also releases the buffers no tensor uses. It stays off on a torch without the storage
    use count it relies on."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled) and _CAN_RECYCLE
    if not _enabled:
        release_grad_buffers()
    return previous


def _is_free(storage: torch.UntypedStorage) -> bool:
    """True when the pool's reference is the only one left (no tensor or view uses the storage)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def release_grad_buffers() -> int:
    """Drop the pooled buffers no tensor uses; returns the bytes given back."""
    released = 0
    with _lock:
        for nbytes, storages in list(_pool.items()):
            kept = [s for s in storages if not _is_free(s)]
            released += nbytes * (len(storages) - len(kept))
            if kept:
                _pool[nbytes] = kept
            else:
                del _pool[nbytes]
    return released


def pooled_bytes() -> int:
    """Bytes the pool holds, free or in use (for tests and logging)."""
    with _lock:
        return sum(nbytes * len(storages) for nbytes, storages in _pool.items())


def empty_grad_like(t: Tensor) -> Tensor:
    """An uninitialised tensor shaped like `t`: contiguous recycled memory when `t` is large, contiguous, on
    the CPU, and recycling is on; otherwise `torch.empty_like(t)`."""
    if not t.is_contiguous():
        return torch.empty_like(t)
    return _empty_recycled(t, t.shape, MIN_BYTES)


def empty_saved(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised contiguous tensor of `shape` with `like`'s dtype and device, for an intermediate the
    dispatch forward saves for its backward (the [N, H] activations: 64 MiB each at T=4096, k=2, d_ff=2048,
    fresh pages every step otherwise). Recycled like the gradients, from SAVED_MIN_BYTES up."""
    return _empty_recycled(like, shape, SAVED_MIN_BYTES)


def _empty_recycled(like: Tensor, shape, min_bytes: int) -> Tensor:
    nbytes = math.prod(shape) * like.element_size()
    if not _enabled or like.device.type != "cpu" or nbytes < min_bytes:
        return like.new_empty(shape)
    with _lock:  # find-and-take is atomic: two backward threads never get the same storage
        storages = _pool.setdefault(nbytes, [])
        storage = next((s for s in storages if _is_free(s)), None)
        if storage is None:
            storage = torch.UntypedStorage(nbytes, device=like.device)
            storages.append(storage)
        return like.new_empty(0).set_(storage, 0, shape)  # no strides given: contiguous ones


__all__ = ["MIN_BYTES", "SAVED_MIN_BYTES", "empty_grad_like", "empty_saved", "pooled_bytes",
           "release_grad_buffers", "set_grad_buffer_recycling"]
