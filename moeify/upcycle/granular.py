"""init="granular": fine-grained upcycling with virtual groups (He et al. 2024, "Upcycling Large Language
Models into Mixture of Experts", as in Megatron-LM's upcycling_utils).

The dense FFN is cut into G = granularity contiguous slices of H/G hidden units (H and E divisible by G).
Expert e holds slice e % G, so the E experts form E/G *virtual groups* (experts gG .. gG+G-1), each a full
copy of the dense FFN. The router rows are tied within each virtual group (E/G distinct rows, each
repeated G times), so the experts of a group always have equal logits and a top-k router with k a
multiple of G selects whole groups.

Weight scaling (the paper's, applied to w2 only): with g0 the weight a selected expert gets under equal
logits (1/k with normalize=True, 1/E for softmax without, 1/2 for sigmoid without), w2 is scaled by
G / (g0 k) and b2 by 1 / (g0 k). normalize=True gives w2 * G, b2 unchanged (Megatron's scale for
topk-then-softmax); softmax without renormalisation gives w2 * E G / k (the paper's softmax-then-topK
scale). Megatron spreads the factor over fc1 and fc2 as roots, which is exact only for positively
homogeneous activations (ReLU); putting it all on w2 keeps it exact for every activation.

Exact at init (every activation, gated or not, bias or not) with the topk router, no capacity limit, and
- normalize=True, k a multiple of G, router_init "random" or "kmeans" (groups never tie with each other,
  so the k selected experts are k/G whole groups, whose weights sum to 1); or
- k = E with normalize=True or softmax scores (any router init), or with sigmoid scores and zero router.
Not claimed: router_init "zeros" with k < E (all logits tie, the selection is up to top-k's tie-breaking),
and softmax/sigmoid without renormalisation for k < E (the selected weights do not sum to g0 k).
G = 1 is copy (with the softmax-then-topK scale E/k when normalize=False); G = E with a zero router is a
contiguous split.
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import ExpertPlan, UpcycleResult, partition_experts, slice_scales
from moeify.upcycle.config import UpcycleError

Tensor = torch.Tensor


def check_granularity(d_ff: int, num_experts: int, granularity: int) -> None:
    G = granularity
    if d_ff % G:
        raise UpcycleError(f"init='granular' cuts the dense d_ff={d_ff} into granularity={G} slices, but "
                           f"{d_ff} is not divisible by {G}; pick a granularity that divides {d_ff}")
    if num_experts % G:
        raise UpcycleError(f"init='granular' needs num_experts ({num_experts}) divisible by granularity "
                           f"({G}): each virtual group holds the {G} slices once; use num_experts a "
                           f"multiple of {G}, or a granularity dividing {num_experts}")


def granular_partition(d_ff: int, num_experts: int, granularity: int) -> Tensor:
    """[E, H/G]: expert e holds the contiguous slice e % G."""
    check_granularity(d_ff, num_experts, granularity)
    Hs = d_ff // granularity
    slices = torch.arange(d_ff).view(granularity, Hs)  # [G, H/G]
    return slices[torch.arange(num_experts) % granularity]


def granular_experts(dense, cfg, calibration, gen, moe_config, dtype) -> ExpertPlan:
    G = cfg.granularity
    partition = granular_partition(dense.d_ff, moe_config.num_experts, G)
    w2_scale, b2_scale = slice_scales(moe_config, G)
    result = UpcycleResult(init="granular", partition=partition, w2_scale=w2_scale, b2_scale=b2_scale)
    return result, partition_experts(dense, partition, w2_scale, b2_scale)
