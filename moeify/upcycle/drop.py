"""init="drop": drop-upcycling (Nakamura et al. 2025, "Drop-Upcycling", ICLR 2025).

Copy, then in each expert re-initialise a random subset of round(r * H) hidden units (r = drop_rate),
drawn independently per expert so experts differ: the unit's row of w1 (gate and up rows together when
gated), its column of w2 and its b1 entries are re-drawn from a normal with the mean and std of the
corresponding dense tensor (as the paper does: statistics of W_gate, W_up and W_down taken separately;
for b1 the dense b1's own statistics, gate and up halves separately). b2 is kept.

Not function-preserving for r > 0 (r = 0 is "copy"; r = 1 re-draws every expert completely).
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import (
    ExpertPlan,
    ExpertTensors,
    normal_like,
    tensor_stats,
)
from moeify.upcycle.copying import copy_experts

Tensor = torch.Tensor


def num_dropped(drop_rate: float, d_ff: int) -> int:
    """round(r * H): the hidden units re-drawn per expert."""
    return int(round(drop_rate * d_ff))


def drop_experts(dense, cfg, calibration, gen, moe_config, dtype) -> ExpertPlan:
    """The copies, each with its own round(r * H) units re-drawn (in the layer's `dtype`), expert by
    expert; `result.redrawn[e]` is filled as expert e is made."""
    result, copies = copy_experts(dense, cfg, calibration, gen, moe_config, dtype)
    result.init = "drop"
    n = num_dropped(cfg.drop_rate, dense.d_ff)
    result.redrawn = torch.empty(moe_config.num_experts, n, dtype=torch.long)
    return result, _redraw(copies, dense, gen, dtype, result.redrawn)


@torch.no_grad()
def _redraw(copies, dense, gen: torch.Generator, dtype: torch.dtype, redrawn: Tensor):
    H, D, n = dense.d_ff, dense.d_model, redrawn.shape[1]
    # (dense block, row offset in w1/b1): gate and up get their own statistics when gated.
    halves = [(0, dense.w1[:H]), (H, dense.w1[H:])] if dense.gated else [(0, dense.w1)]
    w1_stats = [(off, *tensor_stats(block)) for off, block in halves]
    b1_stats = ([(off, *tensor_stats(dense.b1[off:off + H])) for off, _ in halves]
                if dense.b1 is not None else [])
    w2_mean, w2_std = tensor_stats(dense.w2)
    for e, copy in enumerate(copies):
        idx = torch.randperm(H, generator=gen)[:n].sort().values  # [n]
        redrawn[e] = idx
        if n == 0:
            yield copy
            continue
        dev_idx = idx.to(dense.w1.device)
        w1 = copy.w1.to(dtype=dtype, copy=True)  # [H1, D]
        for off, mean, std in w1_stats:
            w1[dev_idx + off] = normal_like((n, D), mean, std, gen).to(w1)
        w2 = copy.w2.to(dtype=dtype, copy=True)  # [D, H]
        w2[:, dev_idx] = normal_like((D, n), w2_mean, w2_std, gen).to(w2)
        b1 = copy.b1
        if b1 is not None:
            b1 = b1.to(dtype=dtype, copy=True)  # [H1]
            for off, mean, std in b1_stats:
                b1[dev_idx + off] = normal_like((n,), mean, std, gen).to(b1)
        yield ExpertTensors(w1, w2, b1, copy.b2)
