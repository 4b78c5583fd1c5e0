"""What a model's MoE layers kept from their last forward, read over the whole model.

    loss = task_loss + moeify.aux_loss(model)      # the routers' auxiliary losses, with gradient
    moeify.routing_stats(model)                    # {"model.layers.0.mlp": RoutingStats(...), ...}

Each `MoELayer` keeps its own last aux loss and statistics (no global state); these two functions walk the
model and gather them.
"""

from __future__ import annotations

import torch
from torch import nn

from moeify.layer import MoELayer
from moeify.stats import RoutingStats

Tensor = torch.Tensor


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary router losses of the last forward over every MoE layer of `model`.

    Returns a zero scalar when no layer has a loss (no MoE layer, not run yet, or coefficients 0). Add it to
    the task loss before `backward()`.
    """
    total = None
    for m in model.modules():
        if isinstance(m, MoELayer) and m.last_aux_loss is not None:
            total = m.last_aux_loss if total is None else total + m.last_aux_loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Module path -> the statistics of that MoE layer's last forward (layers not yet run are absent)."""
    return {name: m.last_stats for name, m in model.named_modules()
            if isinstance(m, MoELayer) and m.last_stats is not None}
