"""`freeze(model, part)`: stop training one part of an MoE model (ST-MoE, Zoph et al. 2022, §4, "fine-tuning
a subset of the parameters": fine-tuning only the non-MoE parameters works about as well as fine-tuning
everything, while fine-tuning only the MoE parameters hurts; freezing the routers is a common stabiliser).

Parts:
  "experts":     every MoE layer's expert weights (routed stacks w1, b1, w2, b2 and its shared experts);
  "routers":     every MoE layer's router parameters (a router shared by several layers counts once);
  "non_experts": every other parameter (attention, embeddings, norms, FFNs left dense, the head). Routers
                 are not included: freeze them separately.
`requires_grad` is set to False on those parameters (so build the optimizer afterwards, or it keeps
zero-gradient entries). Nothing else changes; `unfreeze` undoes it for the same part.
"""

from __future__ import annotations

from torch import nn

from moeify.errors import ConfigError
from moeify.layer import MoELayer

PARTS = ("experts", "routers", "non_experts")


def _parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r} to freeze; valid: {', '.join(PARTS)}")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ConfigError("the model has no MoELayer; convert it first (moeify.convert)")
    routers = {id(p): p for layer in layers for p in layer.router.parameters()}
    experts = {id(p): p for layer in layers for name, p in layer.named_parameters()
               if not name.startswith("router.")}
    if part == "routers":
        return list(routers.values())
    if part == "experts":
        return list(experts.values())
    return [p for p in model.parameters() if id(p) not in routers and id(p) not in experts]


def freeze(model: nn.Module, part: str) -> int:
    """Set requires_grad=False on `part` ("experts", "routers" or "non_experts") of `model`; returns the
    number of parameter elements frozen."""
    params = _parameters(model, part)
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)


def unfreeze(model: nn.Module, part: str) -> int:
    """Undo `freeze` for `part`; returns the number of parameter elements made trainable."""
    params = _parameters(model, part)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)
