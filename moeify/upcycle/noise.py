"""init="noise": copy, then add Gaussian noise to every expert so the copies differ from the start.

Each expert's w1, b1, w2, b2 gets independent noise N(0, (noise_std * s)^2) where s is the std of the
corresponding dense tensor (a tensor with zero std, e.g. an all-zero bias, stays as it is). The expert
weights move by about `noise_std` relative to their scale, so the layer is close to but not exactly the
dense FFN (exact only for noise_std = 0, where it is "copy").
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import UpcycleResult, tensor_stats
from moeify.upcycle.copying import upcycle_copy

Tensor = torch.Tensor


@torch.no_grad()
def upcycle_noise(layer, dense, cfg, calibration, gen) -> UpcycleResult:
    result = upcycle_copy(layer, dense, cfg, calibration, gen)
    result.init = "noise"
    if cfg.noise_std == 0:
        return result
    pairs = [(layer.w1, dense.w1), (layer.w2, dense.w2), (layer.b1, dense.b1), (layer.b2, dense.b2)]
    for e in range(layer.w1.shape[0]):
        for target, source in pairs:
            if target is None or source is None:
                continue
            _, std = tensor_stats(source)
            noise = torch.randn(target.shape[1:], generator=gen) * (cfg.noise_std * std)
            target[e].add_(noise.to(device=target.device, dtype=target.dtype))
    return result
