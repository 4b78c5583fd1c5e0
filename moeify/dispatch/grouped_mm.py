"""Grouped GEMMs over expert-sorted rows: `torch._grouped_mm`, or a loop over experts where it cannot run.

Shape legend: N sorted rows, E experts (groups), K contraction width, P and Q output widths.
`offs` [E] int32 is the end row of each group (cumulative sizes, on the device); rows at or past
offs[-1] belong to no group (dropped assignments).

What `torch._grouped_mm` does here (checked on torch 2.13, CPU):
  - 2d x 3d: a [N, K], b [E, K, P] -> [N, P], group e's rows times b[e]. Rows past offs[-1] come back
    uninitialised (garbage), so `grouped_linear` zeroes them.
  - 2d x 2d: a [P, N], b [N, Q] -> [E, P, Q], group e = a[:, its rows] @ b[its rows]. An empty group
    gives zeros; rows past offs[-1] are ignored. This is the weight gradient.
  - dtypes float32, bfloat16, float16 (not float64); offs must be int32; every stride of a and b (but the
    unit one) and the base addresses must be multiples of 16 bytes (else "strides should be multiple of
    16 bytes"); torch 2.8 and older have no CPU kernel.
  - Its own autograd fails on CPU ("Invalid strides/sizes, got [0, 0] for strides"), so the dispatch
    backward calls it directly with the gradient GEMMs written out (`moeify.dispatch.grouped`).
  - On CUDA, only bfloat16 on compute capability 9.0+ takes the fused kernel, which reads `offs` on the
    device; float32/float16 (and bfloat16 on 8.x) use torch's own per-group fallback, which copies the
    offsets to the host (one synchronisation per call). Its meta kernel accepts bfloat16 only. So off the
    CPU, moeify uses `_grouped_mm` for bfloat16 only.
Where `_grouped_mm` cannot run (dtype, alignment, old torch, older GPU) the loop here does the same
computation one expert at a time, which needs the group sizes on the host: one synchronisation per call.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16  # bytes


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    strides = (s for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1)
    strides_ok = all(s * size % _ALIGN == 0 for s in strides)
    return strides_ok and t.data_ptr() % _ALIGN == 0


def _torch_has_kernel(device: torch.device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 9)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "meta"  # shapes only (the no-host-read tests run the dispatch on meta tensors)


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes `_grouped_mm` is used for. On CUDA only bfloat16: the fused kernel, no host sync (torch's
    float32/float16 fallback syncs like our loop, and torch's meta kernel, which torch.compile traces,
    accepts bfloat16 only)."""
    return GROUPED_MM_DTYPES if device.type == "cpu" else (torch.bfloat16,)


def grouped_mm_runs(a: Tensor, b: Tensor) -> bool:
    """True when `torch._grouped_mm(a, b, offs=...)` runs for these operands on this build and device."""
    return (a.dtype in _dtypes(a.device) and b.dtype == a.dtype and _torch_has_kernel(a.device)
            and _aligned(a) and _aligned(b))


def _group_bounds(offs: Tensor) -> list[int]:
    """[0, end_0, ..., end_{E-1}] on the host: the loop's one synchronisation."""
    return [0] + offs.tolist()


def grouped_linear(a: Tensor, b: Tensor, offs: Tensor, use_grouped_mm: bool | None = None) -> Tensor:
    """out[rows of group e] = a[rows of group e] @ b[e]; rows past offs[-1] zero.

    a [N, K], b [E, K, P] (any strides; pass `w.transpose(1, 2)` for `x @ w[e].T`) -> [N, P].
    `use_grouped_mm` forces the choice (tests); None picks `_grouped_mm` where it runs."""
    N, P = a.shape[0], b.shape[2]
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_runs(a, b)
    if use_grouped_mm:
        out = torch._grouped_mm(a, b, offs=offs)  # [N, P]
        in_a_group = torch.arange(N, device=a.device) < offs[-1:]  # [N]
        return out.masked_fill_(~in_a_group.unsqueeze(1), 0)
    out = a.new_zeros(N, P)  # [N, P]
    bounds = _group_bounds(offs)
    for e in range(b.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            torch.mm(a[s:t], b[e], out=out[s:t])
    return out


def grouped_weight_grad(a: Tensor, b: Tensor, offs: Tensor, use_grouped_mm: bool | None = None) -> Tensor:
    """out[e] = a[rows of e].T @ b[rows of e]: the per-expert weight gradient; zero for an empty group.

    a [N, P], b [N, Q] -> [E, P, Q]. Rows past offs[-1] are ignored."""
    E, P, Q = offs.shape[0], a.shape[1], b.shape[1]
    a_t = a.t()  # [P, N]
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_runs(a_t, b)
    if use_grouped_mm:
        return torch._grouped_mm(a_t, b, offs=offs)  # [E, P, Q]
    out = a.new_zeros(E, P, Q)  # [E, P, Q]
    bounds = _group_bounds(offs)
    for e in range(E):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            torch.mm(a_t[:, s:t], b[s:t], out=out[e])
    return out


__all__ = ["GROUPED_MM_DTYPES", "grouped_linear", "grouped_mm_runs", "grouped_weight_grad"]
