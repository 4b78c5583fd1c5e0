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

from moeify.upcycle._common import UpcycleResult, normal_like, tensor_stats
from moeify.upcycle.copying import upcycle_copy

Tensor = torch.Tensor


def num_dropped(drop_rate: float, d_ff: int) -> int:
    """round(r * H): the hidden units re-drawn per expert."""
    return int(round(drop_rate * d_ff))


@torch.no_grad()
def upcycle_drop(layer, dense, cfg, calibration, gen) -> UpcycleResult:
    result = upcycle_copy(layer, dense, cfg, calibration, gen)
    result.init = "drop"
    E, H = layer.w1.shape[0], dense.d_ff
    n = num_dropped(cfg.drop_rate, H)
    # (dense block, row offset in w1/b1): gate and up get their own statistics when gated.
    halves = [(0, dense.w1[:H]), (H, dense.w1[H:])] if dense.gated else [(0, dense.w1)]
    w1_stats = [(off, *tensor_stats(block)) for off, block in halves]
    b1_stats = ([(off, *tensor_stats(dense.b1[off:off + H])) for off, _ in halves]
                if dense.b1 is not None else [])
    w2_mean, w2_std = tensor_stats(dense.w2)
    D = dense.d_model
    redrawn = torch.empty(E, n, dtype=torch.long)
    for e in range(E):
        idx = torch.randperm(H, generator=gen)[:n].sort().values  # [n]
        redrawn[e] = idx
        if n == 0:
            continue
        dev_idx = idx.to(layer.w1.device)
        for off, mean, std in w1_stats:
            layer.w1[e, dev_idx + off] = normal_like((n, D), mean, std, gen).to(layer.w1)
        layer.w2[e][:, dev_idx] = normal_like((D, n), w2_mean, w2_std, gen).to(layer.w2)
        if layer.b1 is not None:
            for off, mean, std in b1_stats:
                layer.b1[e, dev_idx + off] = normal_like((n,), mean, std, gen).to(layer.b1)
    result.redrawn = redrawn
    return result
