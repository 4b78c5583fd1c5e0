"""Upcycling entry points: `expert_d_ff`, `upcycle_layer` and `upcycle_layer_lazily` (the experts one at a
time), dispatching to one file per strategy.

Shape legend: D d_model, H dense d_ff, H1 = 2H when gated, E experts, G granularity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moeify.upcycle._common import ExpertPlan, ExpertTensors, UpcycleResult, fill_experts, make_generator
from moeify.upcycle.config import DenseFFNWeights, UpcycleConfig, UpcycleError
from moeify.upcycle.copying import copy_experts
from moeify.upcycle.drop import drop_experts
from moeify.upcycle.granular import check_granularity, granular_experts
from moeify.upcycle.mpo import upcycle_mpo
from moeify.upcycle.noise import noise_experts
from moeify.upcycle.router_init import init_router
from moeify.upcycle.split import check_split, split_experts

Tensor = torch.Tensor

# init -> experts(dense, cfg, calibration, generator, moe_config, dtype) -> (UpcycleResult, experts one
# at a time): each strategy, in its own file.
EXPERT_PLANS: dict[str, Callable[..., ExpertPlan]] = {
    "copy": copy_experts,
    "noise": noise_experts,
    "drop": drop_experts,
    "split": split_experts,
    "granular": granular_experts,
}


def _filling(plan: Callable[..., ExpertPlan]) -> Callable[..., UpcycleResult]:
    """fill(layer, dense, cfg, calibration, generator) -> UpcycleResult: `plan`'s experts copied into the
    layer."""

    @torch.no_grad()
    def fill(layer, dense: DenseFFNWeights, cfg: UpcycleConfig, calibration, gen) -> UpcycleResult:
        result, experts = plan(dense, cfg, calibration, gen, layer.config, layer.w1.dtype)
        fill_experts(layer, experts)
        return result

    return fill


# init -> fill(layer, dense, cfg, calibration, generator) -> UpcycleResult
STRATEGIES: dict[str, Callable[..., UpcycleResult]] = {
    init: _filling(plan) for init, plan in EXPERT_PLANS.items()
}
# Router inits that read the filled experts: a layer upcycled with one is made whole (upcycle_layer_lazily).
READS_EXPERTS = frozenset({"avg_k"})

__all__ = ["DenseFFNWeights", "EXPERT_PLANS", "ExpertTensors", "STRATEGIES", "UpcycleConfig", "UpcycleResult",
           "expert_d_ff", "experts_one_at_a_time", "upcycle_layer", "upcycle_layer_lazily"]


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

    init="none" leaves everything as it is. Otherwise the experts are filled by the strategy (one at a
    time, see `EXPERT_PLANS`), the router per `cfg.resolved_router_init`, and shared experts (if any) get
    a zero output projection (w2, b2), so they add nothing at init and the dense function is kept; they
    train from there.
    """
    if cfg.init == "none":
        return UpcycleResult(init="none")
    if layer.config.expert_param == "mpo":  # one decomposition shared by every expert (moeify.upcycle.mpo)
        _check_fit(layer, dense, cfg)
        result = upcycle_mpo(layer, dense, cfg)
    else:
        result, experts = _plan(layer, dense, cfg, calibration, key)
        fill_experts(layer, experts)
    _init_rest(layer, cfg, calibration, key, result)
    return result


def upcycle_layer_lazily(layer, dense: DenseFFNWeights, cfg: UpcycleConfig, calibration: Tensor | None = None,
                         *, key: int | str = 0) -> tuple[UpcycleResult, Iterator[ExpertTensors]]:
    """`upcycle_layer` without filling the experts: the router and shared experts are initialised, the
    experts come back one at a time (in order, each once; cast each to the layer's dtype), equal to what
    `upcycle_layer` puts in layer.w1[e] etc. The layer's expert tensors are not read or written (they may
    be on the meta device). What streaming conversion writes from, one expert in memory at a time.

    Every data-free init and the calibrated split are lazy; a router init that reads the experts
    (READS_EXPERTS: "avg_k") is not, and raises UpcycleError (use `upcycle_layer`).
    """
    if not experts_one_at_a_time(cfg):
        raise UpcycleError(f"init={cfg.init!r} with router_init={cfg.resolved_router_init!r} builds the "
                           "experts whole; use upcycle_layer")
    result, experts = _plan(layer, dense, cfg, calibration, key)
    _init_rest(layer, cfg, calibration, key, result)
    return result, experts


def experts_one_at_a_time(cfg: UpcycleConfig) -> bool:
    """Whether `upcycle_layer_lazily` takes `cfg`: a strategy of EXPERT_PLANS and a router init that does
    not read the experts."""
    return cfg.init in EXPERT_PLANS and cfg.resolved_router_init not in READS_EXPERTS


def _plan(layer, dense: DenseFFNWeights, cfg: UpcycleConfig, calibration, key) -> ExpertPlan:
    _check_fit(layer, dense, cfg)
    gen = make_generator(cfg.seed, key, "experts")
    return EXPERT_PLANS[cfg.init](dense, cfg, calibration, gen, layer.config, layer.w1.dtype)


def _init_rest(layer, cfg: UpcycleConfig, calibration, key, result: UpcycleResult) -> None:
    """The router (its own generator, so independent of when the experts are drawn) and shared experts."""
    groups = cfg.granularity if cfg.init == "granular" else 1
    result.router_init = init_router(layer, cfg, calibration, make_generator(cfg.seed, key, "router"),
                                     groups)
    shared = getattr(layer, "shared", None)
    if shared is not None:
        shared.w2.zero_()
        if shared.b2 is not None:
            shared.b2.zero_()
