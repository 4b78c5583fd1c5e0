"""init="split": MoEfication (Zhang et al. 2022) / LLaMA-MoE neuron partition.

The H dense hidden units are partitioned into E experts of H/E units each (H must be divisible by E).
A dense FFN is a sum over its hidden units, so the E experts together are the dense FFN:
    dense(x) = sum_e w2[:, P_e] act(w1[P_e] x + b1[P_e]) + b2.
split_method:
- "random": a seeded random permutation of the units, cut into E blocks.
- "cluster": balanced k-means (every cluster exactly H/E units) of the neurons, so co-firing units share
  an expert. Features: the neuron's activations on the calibration tokens (L2-normalised, i.e. cosine),
  when calibration is given (`UpcycleResult.split_features == "activations"`); otherwise the neuron's row
  of w1 ([gate row, up row] when gated, L2-normalised) (`split_features == "w1 rows"`).

Router and scaling (what makes k = E exact): the router starts at zero (router_init default "zeros" for
split), so all logits tie and every selected expert gets the same weight g0 (1/k with normalize=True,
1/E for softmax without renormalisation, 1/2 for sigmoid without). Expert w2 columns are scaled by
E / (g0 k) and b2 by 1 / (g0 k): with normalize=True that is w2 * E and b2 as is. With k = E every expert
is selected, the weighted w2 slices sum to w2 and the E copies of b2 weigh 1 / (g0 k) * g0 * k = 1 in total,
so b2 is added exactly once and the layer equals the dense FFN for every activation, gated or not.
For k < E (the usual MoEfication regime) the same scaling makes the layer, under a uniform router, an
unbiased estimate of the dense FFN over which k experts are chosen; it is not exact.
"""

from __future__ import annotations

import logging

import torch

from moeify.activations import apply_expert_activation
from moeify.upcycle._common import (
    MAX_NEURON_FEATURE_TOKENS,
    ExpertPlan,
    UpcycleResult,
    flatten_calibration,
    partition_experts,
    slice_scales,
)
from moeify.upcycle.config import UpcycleError
from moeify.upcycle.kmeans import balanced_kmeans

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def check_split(d_ff: int, num_experts: int) -> None:
    if d_ff % num_experts:
        raise UpcycleError(f"init='split' cuts the dense d_ff={d_ff} into num_experts={num_experts} equal "
                           f"parts, but {d_ff} is not divisible by {num_experts}; pick num_experts among "
                           f"the divisors of {d_ff}, or use init='copy' or 'granular'")


def neuron_features(dense, calibration: Tensor | None, gen: torch.Generator) -> tuple[Tensor, str]:
    """[H, F] features of each dense hidden unit for clustering, and which ones they are."""
    H = dense.d_ff
    w1 = dense.w1.float()
    if calibration is not None:
        x = flatten_calibration(calibration, dense.d_model, gen, MAX_NEURON_FEATURE_TOKENS)  # [N, D]
        x = x.to(w1.device)
        h = x @ w1.t()  # [N, H1]
        if dense.b1 is not None:
            h = h + dense.b1.float()
        a = apply_expert_activation(h, dense.act, dense.gated)  # [N, H]
        return _unit_rows(a.t()), "activations"
    rows = torch.cat([w1[:H], w1[H:]], dim=1) if dense.gated else w1  # [H, D or 2D]
    return _unit_rows(rows), "w1 rows"


def neuron_partition(dense, num_experts: int, cfg, calibration: Tensor | None,
                     gen: torch.Generator) -> tuple[Tensor, str | None]:
    """[E, H/E] int64 (each row sorted): every dense hidden unit in exactly one expert; + features used."""
    H, E = dense.d_ff, num_experts
    check_split(H, E)
    if cfg.split_method == "random":
        labels = torch.empty(H, dtype=torch.long)
        labels[torch.randperm(H, generator=gen)] = torch.arange(H) // (H // E)
        features = None
    else:
        feats, features = neuron_features(dense, calibration, gen)
        log.info("split: clustering %d neurons into %d experts on their %s", H, E, features)
        labels = balanced_kmeans(feats, E, gen, cfg.kmeans_iters).cpu()
    order = torch.argsort(labels * H + torch.arange(H))  # by expert, then by unit index
    return order.view(E, H // E), features


def split_experts(dense, cfg, calibration, gen, moe_config, dtype) -> ExpertPlan:
    """The partition is made first (from the dense FFN, and the calibration for "cluster"), then the
    experts one at a time."""
    E = moe_config.num_experts
    partition, features = neuron_partition(dense, E, cfg, calibration, gen)
    w2_scale, b2_scale = slice_scales(moe_config, E)
    result = UpcycleResult(init="split", partition=partition, split_features=features, w2_scale=w2_scale,
                           b2_scale=b2_scale)
    return result, partition_experts(dense, partition, w2_scale, b2_scale)
