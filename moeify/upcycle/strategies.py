"""Upcycling strategies. Shape legend: D d_model, H dense d_ff, H1 = 2H when gated, E experts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moeify.config import ConfigError

Tensor = torch.Tensor

INITS = ("copy", "none")


@dataclass(frozen=True)
class DenseFFNWeights:
    w1: Tensor  # [H1, D]; gated: rows [0, H) gate, [H, 2H) up
    b1: Tensor | None  # [H1]
    w2: Tensor  # [D, H]
    b2: Tensor | None  # [D]
    activation: str
    gated: bool

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w2.shape[1]


@dataclass(frozen=True)
class UpcycleConfig:
    init: str = "copy"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def expert_d_ff(cfg: UpcycleConfig, dense_d_ff: int, num_experts: int) -> int:
    return dense_d_ff


@torch.no_grad()
def upcycle_layer(layer, dense: DenseFFNWeights, cfg: UpcycleConfig, calibration: Tensor | None = None) -> None:
    """Fill layer.w1/b1/w2/b2 (and the router) from `dense`, in place."""
    if cfg.init == "none":
        return
    layer.w1.copy_(dense.w1.unsqueeze(0).expand_as(layer.w1))  # [E, H1, D]
    layer.w2.copy_(dense.w2.unsqueeze(0).expand_as(layer.w2))  # [E, D, H]
    if layer.b1 is not None:
        layer.b1.copy_(dense.b1.unsqueeze(0).expand_as(layer.b1))
    if layer.b2 is not None:
        layer.b2.copy_(dense.b2.unsqueeze(0).expand_as(layer.b2))
