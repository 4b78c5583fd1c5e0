"""Upcycling entry points: `expert_d_ff` and `upcycle_layer`, dispatching to one file per strategy.

Shape legend: D d_model, H dense d_ff, H1 = 2H when gated, E experts, G granularity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeify.upcycle._common import UpcycleResult, make_generator
from moeify.upcycle.config import DenseFFNWeights, UpcycleConfig, UpcycleError
from moeify.upcycle.copying import upcycle_copy
from moeify.upcycle.drop import upcycle_drop
from moeify.upcycle.granular import check_granularity, upcycle_granular
from moeify.upcycle.mpo import upcycle_mpo
from moeify.upcycle.noise import upcycle_noise
from moeify.upcycle.router_init import init_router
from moeify.upcycle.split import check_split, upcycle_split

Tensor = torch.Tensor

# init -> fill(layer, dense, cfg, calibration, generator) -> UpcycleResult
STRATEGIES: dict[str, Callable[..., UpcycleResult]] = {
    "copy": upcycle_copy,
    "noise": upcycle_noise,
    "drop": upcycle_drop,
    "split": upcycle_split,
    "granular": upcycle_granular,
}

__all__ = ["DenseFFNWeights", "STRATEGIES", "UpcycleConfig", "UpcycleResult", "expert_d_ff", "upcycle_layer"]


def expert_d_ff(cfg: UpcycleConfig, dense_d_ff: int, num_experts: int) -> int:
    """Each expert's hidden width: H for copy/noise/drop/none, H/E for split, H/G for granular.

    Raises UpcycleError when the division is not exact (the message says what would fit).
    """
    if cfg.init == "split":
        check_split(dense_d_ff, num_experts)
        return dense_d_ff // num_experts
    if cfg.init == "granular":
        check_granularity(dense_d_ff, num_experts, cfg.granularity)
        return dense_d_ff // cfg.granularity
    return dense_d_ff


def _check_fit(layer, dense: DenseFFNWeights, cfg: UpcycleConfig) -> None:
    c = layer.config
    E = c.num_experts
    if c.d_model != dense.d_model:
        raise UpcycleError(f"the MoE layer has d_model={c.d_model} but the dense FFN has {dense.d_model}")
    if c.gated != dense.gated:
        raise UpcycleError(f"the dense FFN is {'gated' if dense.gated else 'not gated'} but the MoE layer "
                           f"was built with gated={c.gated}; build it with gated={dense.gated}")
    if c.activation != dense.activation:
        raise UpcycleError(f"the dense FFN uses activation {dense.activation!r} but the MoE layer "
                           f"{c.activation!r}; build it with activation={dense.activation!r}")
    want = expert_d_ff(cfg, dense.d_ff, E)
    if c.d_ff != want:
        raise UpcycleError(f"init={cfg.init!r} gives experts of width {want} (dense d_ff={dense.d_ff}, "
                           f"{E} experts) but the MoE layer has d_ff={c.d_ff}; build it with "
                           f"d_ff=expert_d_ff(cfg, {dense.d_ff}, {E}) = {want}")
    for name in ("b1", "b2"):
        if getattr(dense, name) is not None and getattr(layer, name) is None:
            raise UpcycleError(f"the dense FFN has a bias ({name}) but the MoE layer was built with "
                               "bias=False; build it with bias=True")


@torch.no_grad()
def upcycle_layer(layer, dense: DenseFFNWeights, cfg: UpcycleConfig, calibration: Tensor | None = None, *,
                  key: int | str = 0) -> UpcycleResult:
    """Fill layer.w1/b1/w2/b2 and the router from `dense`, in place; returns what was done.

    MPO experts (`expert_param="mpo"`) take init="copy" only: `moeify.upcycle.mpo`.

    Args:
        layer: a `MoELayer` built for the strategy (d_ff = `expert_d_ff(cfg, dense.d_ff, E)`, same
            d_model, activation and gating as the dense FFN; bias=True when the dense FFN has biases).
        dense: the dense FFN's weights.
        cfg: the strategy and its options.
        calibration: hidden states entering this FFN, [..., D] (any leading dims; at most
            MAX_CALIBRATION_TOKENS are used). Needed by router_init="kmeans"; used by
            split_method="cluster" (which otherwise clusters w1 rows). Ignored otherwise.
        key: names the layer (e.g. its module path, or its index) so that layers upcycled with the same
            seed get independent draws. Same seed + key + inputs -> same weights.

    init="none" leaves everything as it is. Otherwise the experts are filled by the strategy, the router
    per `cfg.resolved_router_init`, and shared experts (if any) get a zero output projection (w2, b2),
    so they add nothing at init and the dense function is kept; they train from there.
    """
    if cfg.init == "none":
        return UpcycleResult(init="none")
    _check_fit(layer, dense, cfg)
    if layer.config.expert_param == "mpo":
        result = upcycle_mpo(layer, dense, cfg)
    else:
        result = STRATEGIES[cfg.init](layer, dense, cfg, calibration, make_generator(cfg.seed, key, "experts"))
    groups = cfg.granularity if cfg.init == "granular" else 1
    result.router_init = init_router(layer, cfg, calibration, make_generator(cfg.seed, key, "router"),
                                     groups)
    shared = getattr(layer, "shared", None)
    if shared is not None:
        shared.w2.zero_()
        if shared.b2 is not None:
            shared.b2.zero_()
    return result
