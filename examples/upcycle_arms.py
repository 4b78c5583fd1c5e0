"""The arms of the upcycling experiment (examples/upcycle_gpt.py): what each one does to the pretrained GPT.

An arm is one way to continue from the dense checkpoint:
  dense            the dense model, trained on
  top1-<init>      every MLP -> an MoE whose tokens each run ONE dense-MLP's worth of experts
                   (the same active FFN FLOPs as dense; the router adds E x D per token)
  top2-<init>      the same with TWO dense-MLP's worth (Komatsuzaki et al.'s decoder setting, k=2)
with <init> one of
  copy             E=8 experts, each a copy of the MLP (the function is unchanged at step 0)
  drop             E=8 copies, each re-drawing a share r=0.5 of its hidden neurons (drop-upcycling)
  granular         E=16 half-width experts: the MLP cut into G=2 slices, expert e holding slice e % 2
                   (He et al. 2024's virtual groups), k = G x width: k=2 for top-1, k=4 for top-2;
                   the same active and total parameters as copy

Routing: top-k over softmax scores, the k selected weights renormalised to sum to 1 (so copies stay exact).
With k=1 renormalising makes every weight exactly 1 and the router would learn only from the auxiliary
losses (see moeify's TopKRouter), so the k=1 arms use `topk-st`, registered here: the same forward values,
but the gradient of the raw softmax probabilities (straight-through through the renormalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import moeify
from moeify.routers import register_router, router_class
from moeify.routers.topk import TopKRouter, token_choice_routing, topk_weights
from moeify.routing import SparseRouting

Tensor = torch.Tensor

EXPERTS = 8  # experts per layer for copy / drop
DROP_RATIO = 0.5  # drop-upcycling: share of each expert's hidden neurons re-drawn
GRANULARITY = 2  # granular: slices of the MLP (E = EXPERTS x GRANULARITY half-width experts)
STRAIGHT_THROUGH = "topk-st"


class StraightThroughTopK(TopKRouter):
    """Top-k whose renormalised weights carry the gradient of the raw probabilities.

    forward: w = p_sel / sum(p_sel), as TopKRouter with normalize=True (copies of the MLP stay exact);
    backward: the sum is treated as a constant, so dw/dlogits = dp_sel/dlogits / sum(p_sel). With k=1 that
    is w = p / p.detach() = 1, with gradient (onehot - p) w.r.t. the logits: the task loss trains the router.
    """

    @classmethod
    def preserves_dense(cls, upcycle, config) -> bool:
        return upcycle.copies_dense and config.capacity_factor is None

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        logits = self.compute_logits(x)  # [T, E]
        cfg = self.config
        scores, top_p, top_idx = topk_weights(logits, cfg.k, False, cfg.score_fn)  # [T, E], [T, K] x2
        top_w = top_p / top_p.sum(dim=-1, keepdim=True).detach().clamp(min=1e-9)  # [T, K]
        return token_choice_routing(self, logits, scores, top_idx, top_w)


def ensure_straight_through_router() -> None:
    """Register `topk-st` once (a second call, or a second import of this module, is a no-op)."""
    try:
        router_class(STRAIGHT_THROUGH)
    except moeify.ConfigError:
        register_router(STRAIGHT_THROUGH)(StraightThroughTopK)


@dataclass(frozen=True)
class Arm:
    """One continuation: dense (init None) or an upcycled MoE with `width` dense-MLPs' worth per token."""

    name: str
    init: str | None = None  # None: dense; else "copy", "drop" or "granular"
    width: int = 0  # active experts per token in units of the dense MLP (1: top-1, 2: top-2)

    @property
    def granularity(self) -> int:
        return GRANULARITY if self.init == "granular" else 1

    @property
    def experts(self) -> int:
        return EXPERTS * self.granularity

    @property
    def k(self) -> int:
        return self.width * self.granularity

    @property
    def router(self) -> str:
        return STRAIGHT_THROUGH if self.k == 1 else "topk"

    def describe(self) -> str:
        if self.init is None:
            return "dense continuation"
        expert = "half-width experts" if self.granularity > 1 else "full-width experts"
        return f"E={self.experts} {expert}, k={self.k} ({self.router}), init={self.init}"


DENSE = Arm("dense")
ARMS: tuple[Arm, ...] = (DENSE, *(Arm(f"top{w}-{init}", init, w)
                                  for w in (1, 2) for init in ("copy", "drop", "granular")))


def arm_named(name: str) -> Arm:
    for arm in ARMS:
        if arm.name == name:
            return arm
    raise KeyError(f"no arm named {name!r}; arms: {', '.join(a.name for a in ARMS)}")


def upcycle(model: nn.Module, arm: Arm, seed: int) -> nn.Module:
    """Every MLP of `model` -> an MoE as `arm` says (a new model; `model` is left as it is)."""
    if arm.init is None:
        return model
    ensure_straight_through_router()
    init = {"init": arm.init}
    if arm.init == "drop":
        init["drop_rate"] = DROP_RATIO
    if arm.init == "granular":
        init["granularity"] = GRANULARITY
    model = moeify.convert(model, experts=arm.experts, k=arm.k, router=arm.router, init=init, seed=seed)
    n_moe = sum(isinstance(m, moeify.MoELayer) for m in model.modules())
    if n_moe != model.config.n_layer:
        raise RuntimeError(f"expected {model.config.n_layer} MoE layers after convert, found {n_moe}")
    return model
