"""init="noise": copy, then add Gaussian noise to every expert so the copies differ from the start.

Each expert's w1, b1, w2, b2 gets independent noise N(0, (noise_std * s)^2) where s is the std of the
corresponding dense tensor (a tensor with zero std, e.g. an all-zero bias, stays as it is). The expert
weights move by about `noise_std` relative to their scale, so the layer is close to but not exactly the
dense FFN (exact only for noise_std = 0, where it is "copy").
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import ExpertPlan, ExpertTensors, tensor_stats
from moeify.upcycle.copying import copy_experts

Tensor = torch.Tensor
PARTS = ("w1", "w2", "b1", "b2")  # the order the noise is drawn in, per expert


def noise_experts(dense, cfg, calibration, gen, moe_config, dtype) -> ExpertPlan:
    """The copies, each tensor + its noise added in the layer's `dtype` (expert by expert, in PARTS order)."""
    result, copies = copy_experts(dense, cfg, calibration, gen, moe_config, dtype)
    result.init = "noise"
    if cfg.noise_std == 0:
        return result, copies
    stds = {name: tensor_stats(getattr(dense, name))[1] for name in PARTS if getattr(dense, name) is not None}
    return result, _noisy(copies, stds, cfg.noise_std, gen, dtype)


@torch.no_grad()
def _noisy(copies, stds: dict[str, float], noise_std: float, gen: torch.Generator, dtype: torch.dtype):
    for copy in copies:
        parts = {}
        for name in PARTS:
            value = getattr(copy, name)
            if name in stds:
                noise = torch.randn(value.shape, generator=gen) * (noise_std * stds[name])
                value = value.to(dtype=dtype, copy=True).add_(noise.to(device=value.device, dtype=dtype))
            parts[name] = value
        yield ExpertTensors(**parts)
