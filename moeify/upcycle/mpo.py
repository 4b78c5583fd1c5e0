"""Upcycling MPO experts (MPOE, Gao et al. 2022, arXiv 2203.01104): decompose the dense FFN, share its centre.

Each dense weight matrix (w1 [H1, D], w2 [D, H]) is decomposed once into an MPO (`moeify.mpo.decompose`:
exact at full bond, truncated SVDs under `mpo_bond`); its central tensor becomes the experts' shared one and
every expert starts from a copy of its auxiliary tensors, with the dense biases. So init="copy" at full bond
is sparse upcycling with every expert exactly the dense FFN (the dense function is kept under the same
routers as a plain copy); with a bond cap every expert is the same truncated FFN, whose relative Frobenius
error per matrix is recorded on the layer (`MPOWeight.truncation_error`) and shown in the conversion report.

Only "copy" is defined: the other strategies change experts relative to each other (noise, re-drawn or
partitioned neurons), which the shared central tensor cannot express per expert.
"""

from __future__ import annotations

import torch

from moeify.upcycle._common import UpcycleResult
from moeify.upcycle.config import DenseFFNWeights, UpcycleConfig, UpcycleError

MPO_INITS = ("copy",)


@torch.no_grad()
def upcycle_mpo(layer, dense: DenseFFNWeights, cfg: UpcycleConfig) -> UpcycleResult:
    """Fill an MPO layer's tensors and biases from `dense` (the strategy must be "copy")."""
    if cfg.init not in MPO_INITS:
        raise UpcycleError(f"init={cfg.init!r} is not defined for MPO experts (expert_param='mpo'): their "
                           "central tensor is shared, so experts can only start as the same decomposed FFN; "
                           "use init='copy' (or 'none')")
    layer.mpo.w1.load_dense(dense.w1.float())  # [H1, D]
    layer.mpo.w2.load_dense(dense.w2.float())  # [D, H]
    for name in ("b1", "b2"):
        bias, src = getattr(layer, name), getattr(dense, name)
        if bias is not None:
            bias.copy_(src.unsqueeze(0).expand_as(bias)) if src is not None else bias.zero_()  # [E, ...]
    return UpcycleResult(init=cfg.init)
