"""Triton kernels for the token permutation by expert and its inverse (see `moeify.dispatch.permute`).

Shape legend: T tokens, D row width, N sorted rows (assignments), BLOCK_D columns per program.

Imported only by `moeify.dispatch.permute` when the Triton backend runs: importing this module imports
Triton. On a machine without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1` set
before this module is imported), which is how CI tests them.

Both kernels copy whole rows, one program per (row, column block): the work is memory-bound, so the only
goals are coalesced row reads and writes and no atomics. The inverse reads each token's rows through a
by-token index (CSR: `token_offs`, `token_rows`) and sums them in float32, in a fixed order, so its
result does not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

MAX_BLOCK_D = 1024


@triton.jit
def _gather_rows_kernel(src_ptr, rows_ptr, valid_ptr, scale_ptr, out_ptr, D, src_stride, out_stride,
                        HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)  # sorted row
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    in_row = cols < D
    read_cols = D * tl.load(valid_ptr + r).to(tl.int32)  # D for a kept row, 0 for a dropped one
    token = tl.load(rows_ptr + r)
    vals = tl.load(src_ptr + token * src_stride + cols, mask=cols < read_cols, other=0.0)  # [BLOCK_D]
    if HAS_SCALE:  # the scale rounded to the row dtype first, then the product in float32 (as torch does)
        scale = tl.load(scale_ptr + r).to(out_ptr.dtype.element_ty).to(tl.float32)
        vals = (vals.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r * out_stride + cols, vals, mask=in_row)


@triton.jit
def _combine_rows_kernel(src_ptr, token_offs_ptr, token_rows_ptr, scale_ptr, out_ptr, D, src_stride,
                         out_stride, HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)  # token
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    in_row = cols < D
    start = tl.load(token_offs_ptr + t)
    end = tl.load(token_offs_ptr + t + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        r = tl.load(token_rows_ptr + j)
        vals = tl.load(src_ptr + r * src_stride + cols, mask=in_row, other=0.0).to(tl.float32)  # [BLOCK_D]
        if HAS_SCALE:
            vals = vals * tl.load(scale_ptr + r).to(tl.float32)
        acc += vals
    tl.store(out_ptr + t * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def gather_rows(src: Tensor, rows_token: Tensor, valid: Tensor, scale: Tensor | None) -> Tensor:
    """src [T, D], rows_token [N], valid [N, 1] bool, scale [N] or None -> [N, D] (dropped rows zero)."""
    src = src.contiguous()
    N, D = rows_token.shape[0], src.shape[1]
    out = src.new_empty(N, D)  # [N, D]
    if N == 0 or D == 0:
        return out
    block = _block_d(D)
    _gather_rows_kernel[(N, triton.cdiv(D, block))](
        src, rows_token, valid.reshape(N).to(torch.int8), src if scale is None else scale.contiguous(), out,
        D, src.stride(0), out.stride(0), HAS_SCALE=scale is not None, BLOCK_D=block)
    return out


def combine_rows(src: Tensor, rows_token: Tensor, num_tokens: int, scale: Tensor | None) -> Tensor:
    """src [N, D], rows_token [N], scale [N] or None -> out [T, D], out[t] = sum of its rows' scale * src."""
    src = src.contiguous()
    N, D = src.shape
    out = src.new_zeros(num_tokens, D)  # [T, D]
    if N == 0 or D == 0 or num_tokens == 0:
        return out
    # By-token index of the sorted rows (no host sync): token t owns token_rows[token_offs[t]:token_offs[t+1]]
    token_rows = torch.argsort(rows_token, stable=True)  # [N]
    counts = torch.zeros(num_tokens + 1, dtype=torch.int64, device=src.device)  # [T+1]
    counts.scatter_add_(0, rows_token + 1, torch.ones_like(rows_token))
    token_offs = counts.cumsum(0)  # [T+1]
    block = _block_d(D)
    _combine_rows_kernel[(num_tokens, triton.cdiv(D, block))](
        src, token_offs, token_rows, src if scale is None else scale.contiguous(), out, D, src.stride(0),
        out.stride(0), HAS_SCALE=scale is not None, BLOCK_D=block)
    return out
