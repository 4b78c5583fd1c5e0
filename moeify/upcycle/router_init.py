"""Router initialisation (`router_init`): the router's weight [E, D] after upcycling.

- "random": normal(0, router_std) (0.02, as the Router's own init), drawn from the seeded generator.
- "zeros": all logits equal at init: every expert gets the same weight (what makes split exact).
- "kmeans": spherical k-means (cosine) of the calibration hidden states (the FFN inputs), E clusters; the
  rows are the unit-norm centroids. Since logits are x . c_e = |x| cos(x, c_e), a token's top-1 expert at
  init is exactly its k-means cluster. Needs calibration.
- "avg_k" (split and granular): row e is the mean of expert e's key rows of w1 (gate rows when gated), the
  block key Avg-K routes with (`moeify.routers.avg_k.mean_keys`); a learned top-k router starting at the
  tied Avg-K router's logits. Read from the experts just filled, after the strategy ran; one row per expert
  (granular experts holding the same slice get equal rows, so `groups` does not tie anything more).

`groups` > 1 (granular) ties the rows within each virtual group: E/groups distinct rows (random draws or
E/groups centroids), each repeated `groups` times. A router without a learned weight (hash routing) is
left as it is. A router shared by several layers (Omni-router) is re-initialised by each layer upcycled
with it; the last one wins.
"""

from __future__ import annotations

import torch

from moeify.routers.avg_k import mean_keys
from moeify.upcycle._common import flatten_calibration
from moeify.upcycle.config import UpcycleError
from moeify.upcycle.kmeans import spherical_kmeans

Tensor = torch.Tensor


@torch.no_grad()
def init_router(layer, cfg, calibration: Tensor | None, gen: torch.Generator, groups: int = 1) -> str:
    """Fill layer.router.weight per cfg.resolved_router_init; returns what was done."""
    mode = cfg.resolved_router_init
    if mode == "kmeans" and calibration is None:
        raise UpcycleError("router_init='kmeans' needs calibration hidden states (the FFN inputs, [..., D]); "
                           "pass calibration=..., or use router_init='random' or 'zeros'")
    weight = getattr(layer.router, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "untouched (router has no learned weight)"
    E, D = layer.config.num_experts, layer.config.d_model
    rows = weight.shape[0]
    # a bi-level router's rows are gates over nodes and over a node's experts, not one row per expert
    per_expert = rows == E and layer.router.caps.expert_groups == 1
    tie = groups > 1 and per_expert
    distinct = rows // groups if tie else rows
    if mode == "zeros":
        weight.zero_()
        return mode
    if mode == "avg_k":
        if rows != E:
            raise UpcycleError(f"router_init='avg_k' needs a router with one row per expert ({E}), this "
                               f"router has {rows}; use router_init='random'")
        weight.copy_(mean_keys(layer.w1.float(), layer.config.gated))  # [E, D]
        return mode
    if mode == "random":
        base = torch.randn(distinct, weight.shape[1], generator=gen) * cfg.router_std
    else:
        if not per_expert:
            raise UpcycleError(f"router_init='kmeans' needs a router with one row per expert ({E}), "
                               f"this router has {rows}; use router_init='random'")
        x = flatten_calibration(calibration, D, gen)
        if x.shape[0] < distinct:
            raise UpcycleError(f"router_init='kmeans' needs at least {distinct} calibration tokens for "
                               f"{distinct} clusters, got {x.shape[0]}")
        base, _ = spherical_kmeans(x, distinct, gen, cfg.kmeans_iters)
    if tie:
        base = base.repeat_interleave(groups, dim=0)
    weight.copy_(base)
    return mode
