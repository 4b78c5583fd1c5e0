"""init="copy": sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling").

Every expert is an exact copy of the dense FFN (w1, b1, w2, b2 unchanged). The layer then computes
(sum of the token's combine weights) * dense(x), so it equals the dense FFN whenever the weights sum to 1:
a top-k router with normalize=True (any k, score function or router init), or softmax scores with k = E.
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import ExpertPlan, UpcycleResult, partition_experts

Tensor = torch.Tensor


def all_units(E: int, H: int) -> Tensor:
    """[E, H]: every expert holds every hidden unit."""
    return torch.arange(H).unsqueeze(0).expand(E, H).contiguous()


def copy_experts(dense, cfg, calibration, gen, moe_config, dtype) -> ExpertPlan:
    """Every expert is the dense FFN's own tensors (no copy made)."""
    partition = all_units(moe_config.num_experts, dense.d_ff)
    return UpcycleResult(init="copy", partition=partition), partition_experts(dense, partition)
